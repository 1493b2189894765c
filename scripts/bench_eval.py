"""Overhead of `rehead eval` over calling lm_eval.simple_evaluate directly, and the offline suite's table.

    python scripts/bench_eval.py CANDIDATE --baseline SRC [--limit N] [--repeat 2]

Direct: load the candidate with transformers, HFLM around it, simple_evaluate on the offline tasks.
rehead: `rehead.eval.evaluate` on the same model and tasks with the baseline's results cached (the
cost a user pays per candidate), report files included. Both in one process, alternated, --repeat times.
"""

import argparse
import json
import sys
import time
from pathlib import Path


def direct(candidate: str, limit, bootstrap_iters: int) -> float:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from rehead import models
    from rehead.eval import harness, offline

    started = time.perf_counter()
    model, tokenizer, _ = models.load(candidate)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    lm_eval.simple_evaluate(model=lm, tasks=list(offline.task_configs().values()), num_fewshot=0, limit=limit,
                            task_manager=harness.task_manager(), log_samples=False, bootstrap_iters=bootstrap_iters)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidate")
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--limit", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-eval")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from rehead.eval import evaluate

    first = evaluate(args.candidate, args.baseline, suite="offline", limit=args.limit, out=args.out)  # fills the cache
    times = {"direct": [], "rehead": []}
    for _ in range(args.repeat):
        times["direct"].append(direct(args.candidate, args.limit, 1000))
        started = time.perf_counter()
        outcome = evaluate(args.candidate, args.baseline, suite="offline", limit=args.limit, out=args.out)
        times["rehead"].append(time.perf_counter() - started)
        assert outcome.baseline_cached
    best = {k: min(v) for k, v in times.items()}
    overhead = best["rehead"] / best["direct"] - 1
    print((Path(args.out) / "report.md").read_text())
    print(f"direct simple_evaluate: {best['direct']:.1f} s   rehead eval (baseline cached): {best['rehead']:.1f} s   "
          f"overhead {100 * overhead:+.1f}%  (best of {args.repeat}; times {times})")
    if args.json:
        Path(args.json).write_text(json.dumps({"times": times, "overhead": overhead,
                                               "average_retention": first.average_retention,
                                               "rows": first.rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
