"""Decode throughput and KV-cache memory of a source and its conversions with HF generate.

    python scripts/bench_decode.py                                  # smollm2-135m + MoH, DHA, GDA; CPU, small
    python scripts/bench_decode.py --device cuda --dtype bf16 --batch 32 --context 2048 --new 128   # GPU

Greedy decoding of --new tokens after a --context-token prompt of real text, batch --batch.
Decode tokens/s excludes the prefill (a generate of one token is timed and subtracted). The KV
cache is measured, not computed: the bytes of every tensor the cache holds after the prefill.
A static cache (torch.compile-friendly) is used where the layout's cache has the config's shape
(source, MoH); DHA (per-layer K/V heads) and GDA (noise keys beside the signal keys) use the
dynamic cache. Conversions are made into --work if missing.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

STATIC_OK = {"source", "moh"}


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):  # GDA keeps its noise keys inside "keys"
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--layouts", default="moh,dha,gda")
    parser.add_argument("--work", default="runs/bench-train")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--text", default="shakespeare-heldout", help="prompt text (a text spec)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from bench_common import conversions

    from rehead import models, text

    specs = conversions(args.source, Path(args.work), [x for x in args.layouts.split(",") if x], calib_tokens=4096)

    rows = []
    for name, spec in specs.items():
        model, tokenizer, _ = models.load(spec, args.dtype, args.device)
        ids = text.blocks(tokenizer, args.text, args.batch * args.context, args.context).to(args.device)
        with torch.no_grad():
            prefill = model(ids, use_cache=True)
        kv = cache_bytes(prefill.past_key_values)
        del prefill
        impl = "static" if name in STATIC_OK else "dynamic"
        kwargs = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, cache_implementation=impl)

        def timed(model, new: int) -> float:
            sync(args.device)
            started = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
            sync(args.device)
            assert out.shape[1] == args.context + new, out.shape
            return time.perf_counter() - started

        timed(model, 2)  # warm-up
        decode = []
        for _ in range(args.repeat):
            decode.append(timed(model, args.new + 1) - timed(model, 1))
        seconds = statistics.median(decode)
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        rows.append({"model": name, "cache": impl, "decode_tokens_per_s": args.batch * args.new / seconds,
                     "kv_bytes": kv, "kv_bytes_per_token": kv / (args.batch * args.context), "peak_gpu_gb": peak})
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    base = rows[0]
    print(f"batch {args.batch}, context {args.context}, {args.new} new tokens, {args.dtype} on {args.device}")
    print(f"{'model':<8} {'cache':<8} {'decode tok/s':>12} {'ratio':>6} {'KV MiB':>8} {'KV B/token':>10} {'vs source':>9}")
    for r in rows:
        print(f"{r['model']:<8} {r['cache']:<8} {r['decode_tokens_per_s']:>12.1f} "
              f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>6.3f} {r['kv_bytes'] / 2**20:>8.1f} "
              f"{r['kv_bytes_per_token']:>10.0f} {r['kv_bytes'] / base['kv_bytes']:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
