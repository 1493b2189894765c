"""Is the planner's price of a fusion the price the model pays? For single-layer DHA fusions of
smollm2-135m (one layer's key or value heads fused to ``--count``, every other layer the source's),
three numbers on the planner's probe (the first 4 calibration sequences of 512 tokens):

- attention: the planner's layer-local price (attention-output error / residual energy);
- logits: ``--allocation logits``'s price, ½ Σ G ⊙ e² per token (convert/sensitivity.py);
- KL: the true mean KL of the final next-token distributions to the source's, per token.

Prints each option's three numbers and the Spearman rank correlation of each price with the KL.

    python scripts/bench_allocation.py --layers 0 4 8 12 16 20 24 28 --json runs/bench_allocation.json
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead import builtin, text
from rehead.convert.dha import DHAOptions, DHARewriter
from rehead.convert.dha_fusion import agglomerate
from rehead.convert.dha_planning import PROBE_SEQUENCES
from rehead.convert.rewriter import Calibration, LayerInput
from rehead.convert.sensitivity import attention_fisher


def ranks(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).argsort().argsort().double()


def spearman(a: list[float], b: list[float]) -> float:
    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


@torch.no_grad()
def layer_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for layer in model.model.layers]
    model(ids)
    for handle in handles:
        handle.remove()
    return inputs


def kl_per_token(model, probe: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        log_q = torch.log_softmax(model(probe).logits.float(), -1)
    return torch.sum(reference.exp() * (reference - log_q), -1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", default="shakespeare,pydoc")
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 4, 8, 12, 16, 20, 24, 28])
    parser.add_argument("--count", type=int, default=1, help="heads the fused kind keeps (of 3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    started = time.perf_counter()
    path = builtin.model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = text.blocks(AutoTokenizer.from_pretrained(path), args.calib, args.calib_tokens, 512)
    probe = ids[:PROBE_SEQUENCES]
    inputs = layer_inputs(model, ids)
    positions = torch.arange(ids.shape[1]).expand(len(ids), -1)
    position = model.model.rotary_emb(inputs[0], positions)
    layers = model.model.layers
    fisher = attention_fisher(lambda i: layers[i], len(layers), inputs[0][:PROBE_SEQUENCES],
                              tuple(t[:PROBE_SEQUENCES] for t in position), model.model.norm,
                              model.lm_head.weight.detach())
    with torch.no_grad():
        reference = torch.log_softmax(model(probe).logits.float(), -1)
    rewriter = DHARewriter(DHAOptions(kv_budget=0.5), json.loads((path / "config.json").read_text()))
    assembly = rewriter.assembly
    rows = []
    for index in args.layers:
        prefix = f"model.layers.{index}."
        tensors = {k.removeprefix(prefix): v.detach() for k, v in model.state_dict().items() if k.startswith(prefix)}
        prices = {}
        for name, sensitivity in (("attention", None), ("logits", fisher[index])):
            layer = LayerInput(index, tensors, layers[index], Calibration(inputs[index], position), sensitivity)
            prices[name] = rewriter.observe_layer(layer).curves
        fusion = assembly.fusion(layer)
        singletons = [(j,) for j in range(rewriter.kv)]
        for kind, error in (("k", fusion.key_error), ("v", fusion.value_error)):
            fused = agglomerate(rewriter.kv, error, 1)[args.count]
            groups = (fused, singletons) if kind == "k" else (singletons, fused)
            attention = assembly.attention(index, *assembly.assemble(fusion, *groups))
            source = layers[index].self_attn
            layers[index].self_attn = attention
            kl = kl_per_token(model, probe, reference)
            layers[index].self_attn = source
            row = {"layer": index, "kind": kind, "heads": args.count, "kl": kl,
                   "attention": prices["attention"][kind][args.count],
                   "logits": prices["logits"][kind][args.count]}
            rows.append(row)
            print(row, flush=True)
    kl = [r["kl"] for r in rows]
    summary = {name: round(spearman([r[name] for r in rows], kl), 3) for name in ("attention", "logits")}
    print("\n| layer | fused | KL per token | logits price | attention price |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['kind'].upper()} → {r['heads']} | {r['kl']:.4f} | {r['logits']:.4f} | "
              f"{r['attention']:.5f} |")
    print(f"\nSpearman rank correlation with the KL: logits price {summary['logits']}, "
          f"attention price {summary['attention']} ({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, "rows": rows,
                                         "spearman": summary}, indent=1))


if __name__ == "__main__":
    main()
