"""kv_a_layernorm: the MLA export's linearised norm against a calibrated γ (the norm left nonlinear).

    python scripts/bench_mla_norm.py runs/mla-half   # an export of `rehead convert ... --to mla`

The export scales the latent far below the norm's eps, so that kv_a_layernorm is linear. The other
route: the latent at its own scale, and per latent dim the γ that best undoes the norm on calibration
text (least squares of γ ⊙ c / rms(c) against c, on 4,096 tokens each of shakespeare and pydoc).
Prints held-out perplexity of both (8,192 tokens of each kind, blocks of 512) in fp32 and bf16.
"""

import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead import metrics, text
from rehead.convert.mla_fusion import NORM_EPS  # kv_a_layernorm's eps, fixed by transformers, written by the export


def latent_scale(attn) -> torch.Tensor:
    """s, the export's scale of the latent rows: γ = √ε / s (convert/mla_fusion.py)."""
    return math.sqrt(NORM_EPS) / attn.kv_a_layernorm.weight[0].double()


def calibrated_gammas(model, calib: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, γ_k = Σ c_k²/r / Σ c_k²/r² over the calibration tokens, r = √(mean(c²) + ε), c unscaled."""
    rank, sums = model.config.kv_lora_rank, {}

    def hook(index, attn):
        def record(module, args, out):
            c = out[..., :rank].double().flatten(0, -2) / latent_scale(attn)
            r2 = c.pow(2).mean(-1, keepdim=True) + NORM_EPS
            num, den = sums.get(index, (0, 0))
            sums[index] = (num + (c.pow(2) / r2.sqrt()).sum(0), den + (c.pow(2) / r2).sum(0))
        return record

    handles = [layer.self_attn.kv_a_proj_with_mqa.register_forward_hook(hook(i, layer.self_attn))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in calib.split(4):
            model(batch)
    for handle in handles:
        handle.remove()
    return [(num / den).float() for num, den in (sums[i] for i in range(len(model.model.layers)))]


def score(model, held: dict, dtype) -> dict:
    model.to(dtype)
    result = {kind: round(metrics.perplexity(model, blocks), 4) for kind, blocks in held.items()}
    model.float()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="a `rehead convert --to mla` output folder")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.export)
    model = AutoModelForCausalLM.from_pretrained(args.export, dtype=torch.float32).eval()
    calib = torch.cat([text.blocks(tokenizer, kind, 4096, 512) for kind in ("shakespeare", "pydoc")])
    held = {kind: text.blocks(tokenizer, kind, 8192, 512) for kind in text.HELDOUT_TEXTS}
    gammas = calibrated_gammas(model, calib)
    results = {"linearised": {"fp32": score(model, held, torch.float32), "bf16": score(model, held, torch.bfloat16)}}
    rank = model.config.kv_lora_rank
    with torch.no_grad():
        for layer, gamma in zip(model.model.layers, gammas):
            attn = layer.self_attn
            attn.kv_a_proj_with_mqa.weight[:rank] /= latent_scale(attn).float()
            attn.kv_a_layernorm.weight.copy_(gamma)
    results["calibrated_gamma"] = {"fp32": score(model, held, torch.float32),
                                   "bf16": score(model, held, torch.bfloat16)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
