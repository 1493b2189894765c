"""Training throughput of `rehead tune` for a source and its conversions, in one process, as ratios.

    python scripts/bench_train.py                      # smollm2-135m and its MoH, DHA, GDA conversions, CPU
    python scripts/bench_train.py --steps 12 --micro-batch 8 --seq-len 1024 --precision bf16   # on a GPU

Each model runs the same loop (LM loss, AdamW, no teacher) for --steps steps; tokens/s is the median
over the steps after the first. Conversions are made into --work if missing. Prints a table and
writes JSON (--json).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--layouts", default="moh,dha,gda")
    parser.add_argument("--work", default="runs/bench-train")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from bench_common import conversions

    from rehead.tune import load, tune

    work = Path(args.work)
    models = conversions(args.source, work, [x for x in args.layouts.split(",") if x], calib_tokens=4096)

    rows = []
    for name, model in models.items():
        run = work / f"run-{name}"
        recipe = load(None, [
            f"model={model}", "data.train=shakespeare", "data.eval=null", f"data.seq_len={args.seq_len}",
            f"train.max_steps={args.steps}", f"train.micro_batch={args.micro_batch}", f"precision={args.precision}",
            f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}", "log=none",
            "resume=never", f"output_dir={run}",
        ])
        if run.exists():
            import shutil

            shutil.rmtree(run)
        started = time.perf_counter()
        tune(recipe)
        wall = time.perf_counter() - started
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [s for s in steps if s["kind"] == "train"][1:]
        tps = statistics.median(s["tokens_per_s"] for s in steps)
        mfu = [s["mfu"] for s in steps if "mfu" in s]
        rows.append({"model": name, "tokens_per_s": tps, "mfu": statistics.median(mfu) if mfu else None,
                     "peak_memory_gb": max(s["peak_memory_gb"] for s in steps), "wall_s": wall})
    base = rows[0]["tokens_per_s"]
    print(f"{'model':<8} {'tokens/s':>10} {'ratio':>6} {'MFU':>6} {'peak GB':>8}")
    for r in rows:
        r["ratio"] = r["tokens_per_s"] / base
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "—"
        print(f"{r['model']:<8} {r['tokens_per_s']:>10.1f} {r['ratio']:>6.3f} {mfu:>6} {r['peak_memory_gb']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
