"""GDA on smollm2-135m: speed and size next to the source, and training-free repurposing.

- forward and forward+backward time of GDA (grow, G signal heads per noise head) relative to
  the source, in the same process, same batch, interleaved runs (median);
- parameter and KV-cache overhead;
- held-out perplexity of ``--mode repurpose`` without training.

    python scripts/bench_gda.py --ratio 3 --json runs/bench_gda.json
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead import builtin, metrics, text
from rehead.convert import convert
from rehead.describe import describe


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = builtin.model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    heldout = text.blocks(tokenizer, "shakespeare-heldout", args.eval_tokens, 512)
    ids = heldout[: args.batch, : args.seq_len]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "args": {**vars(args), "json": str(args.json)}}
    with tempfile.TemporaryDirectory() as tmp:
        gda = convert("smollm2-135m", Path(tmp) / "gda", to="gda", ratio=args.ratio)
        models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                  for name, path in (("source", source), ("gda", gda))}
        speed = {name: {"forward": [], "forward+backward": []} for name in models}
        for _ in range(args.repeat):  # interleaved, so that drift hits both alike
            for name, model in models.items():
                model.eval()
                with torch.no_grad():
                    speed[name]["forward"] += timed(lambda: model(ids), 1)
                model.train()
                speed[name]["forward+backward"] += timed(lambda: model(ids, labels=ids).loss.backward(), 1)
                model.zero_grad(set_to_none=True)
        for name in speed:
            for kind, values in speed[name].items():
                speed[name][kind] = round(statistics.median(values), 3)
        results["seconds"] = speed
        results["ratio_to_source"] = {kind: round(speed["gda"][kind] / speed["source"][kind], 3)
                                      for kind in ("forward", "forward+backward")}
        info = {name: describe(path) for name, path in (("source", source), ("gda", gda))}
        results["parameters"] = {name: i["parameters"] for name, i in info.items()}
        results["kv_cache_bytes_per_token_bf16"] = {name: i["kv_cache_bytes_per_token_bf16"] for name, i in info.items()}
        print(json.dumps({k: results[k] for k in ("seconds", "ratio_to_source", "parameters",
                                                  "kv_cache_bytes_per_token_bf16")}, indent=1), flush=True)
        del models

        ppl = {"smollm2-135m": metrics.perplexity(AutoModelForCausalLM.from_pretrained(source).eval(), heldout)}
        for src, ratio in (("smollm2-135m", 2), ("smollm2-135m-mha", 2), ("smollm2-135m-mha", 8)):
            out = convert(src, Path(tmp) / "rep", to="gda", ratio=ratio, mode="repurpose", overwrite=True)
            name = f"{src} repurpose G={ratio} (groups of {ratio + 1})"
            ppl[name] = metrics.perplexity(AutoModelForCausalLM.from_pretrained(out).eval(), heldout)
            print(name, round(ppl[name], 3), flush=True)
        results["heldout_perplexity"] = {k: round(v, 3) for k, v in ppl.items()}
    print(json.dumps(results["heldout_perplexity"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
