"""What per-head q/k norms cost DHA's key fusion: the same conversion of smollm2-135m and of a Qwen3 of
its weights (no real Qwen3 is available offline).

The Qwen3 twin ("smollm2-135m-qk") is smollm2-135m with an RMSNorm over head_dim on every head's query
and key before RoPE, whose weights g are measured so that each dimension keeps its RMS on calibration
text: g_t = sqrt(E[u_t²] / E[u_t²/r²]), u the head's projection, r its RMS over head_dim (per layer,
over the heads and tokens). It computes nearly smollm2's function, less the keys' and queries' per-token
scale. Each source is converted with the same options (``--to dha``, the pipeline's preset and lighter
settings by default) and every model is scored on the held-out kinds; the table gives each conversion's
perplexity as a multiple of its own source's.

    python scripts/bench_qk_norm.py --work runs/bench_qk_norm
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from bench_general import score  # the held-out kinds' perplexity, as every benchmark scores them
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead import builtin, text
from rehead.convert import convert


def twin(source: Path, folder: Path, calib: str, tokens: int) -> Path:
    """smollm2-135m with Qwen3's per-head q/k norms, their weights measured on ``calib``."""
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    d = model.config.head_dim
    sums = {}

    def hook(name):
        def on_output(module, args, output):
            u = output.double().unflatten(-1, (-1, d)).flatten(0, 2)  # (tokens·heads, d)
            r2 = u.pow(2).mean(-1, keepdim=True)
            plain, normed = sums.setdefault(name, [torch.zeros(d, dtype=torch.float64)] * 2)
            sums[name] = [plain + u.pow(2).sum(0), normed + (u.pow(2) / r2).sum(0)]
        return on_output

    handles = []
    for i, layer in enumerate(model.model.layers):
        for proj, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
            handles.append(getattr(layer.self_attn, proj).register_forward_hook(hook(f"model.layers.{i}.self_attn.{norm}")))
    with torch.no_grad():
        for block in text.blocks(tokenizer, calib, tokens, 512).split(4):
            model(block)
    for handle in handles:
        handle.remove()
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(shard))
    tensors.update({f"{name}.weight": (plain / normed).sqrt().float() for name, (plain, normed) in sums.items()})
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], use_sliding_window=False,
                  sliding_window=None, max_window_layers=config["num_hidden_layers"],
                  layer_types=["full_attention"] * config["num_hidden_layers"], head_dim=d)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_qk_norm"))
    parser.add_argument("--calib", default="shakespeare,pydoc")
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--options", default='{"to": "dha", "kv_budget": 0.5, "refine_steps": 0}',
                        help="rehead convert's options, as JSON")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    options = json.loads(args.options)
    source = builtin.model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    sources = {"smollm2-135m": source,
               "smollm2-135m-qk": twin(source, args.work / "smollm2-135m-qk", args.calib, args.calib_tokens)}
    rows = {}
    for name, folder in sources.items():
        start = time.perf_counter()
        out = convert(folder, args.work / f"{name}-dha", calib=args.calib, calib_tokens=args.calib_tokens,
                      overwrite=True, **options)
        seconds = round(time.perf_counter() - start, 1)
        rows[name] = {"source": score(folder, tokenizer, args.eval_tokens), "converted": score(out, tokenizer, args.eval_tokens),
                      "convert_seconds": seconds}
        print(name, rows[name], flush=True)
    (args.work / "result.json").write_text(json.dumps({"options": options, "rows": rows, "date": time.strftime("%Y-%m-%d"),
                                                       "torch": torch.__version__}, indent=1))
    kinds = list(text.HELDOUT_TEXTS)
    print(f"| source | {' | '.join(kinds)} | convert s |\n|---|" + "---:|" * (len(kinds) + 1))
    for name, row in rows.items():
        cells = [f"{row['source'][k]:.2f} → {row['converted'][k]:.2f} (×{row['converted'][k] / row['source'][k]:.2f})"
                 for k in kinds]
        print(f"| {name} | {' | '.join(cells)} | {row['convert_seconds']} |")


if __name__ == "__main__":
    main()
