"""Training-free held-out perplexity of smollm2-135m converted to a layout, next to the original.

Calibration uses the built-in ``shakespeare`` text; perplexity is measured on text calibration
never saw: ``shakespeare-heldout`` (other plays) and ``pydoc`` (Python's reference text).

    python scripts/bench_ppl.py moh --json runs/bench_ppl_moh.json
    python scripts/bench_ppl.py dha --json runs/bench_ppl_dha.json
    python scripts/bench_ppl.py deci --eval-tokens 8192 --json runs/bench_ppl_deci.json

``deci`` compares, at budgets 1/2 and 1/3, the free DHA plan, the plan constrained to what the
DeciLM export can write (``--export deci``) and ``--uniform`` (where the budget is a whole divisor).
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead import builtin, metrics, text
from rehead.convert import convert
from rehead.provenance import Provenance

# layout -> {row name: convert options}
VARIANTS = {
    "moh": {
        "query-norm router, first heads shared": dict(active_heads=7, shared_heads=4, shared="first"),
        "query-norm router, calibrated shared heads": dict(active_heads=7, shared_heads=4),
        "learned router (fitted), calibrated shared heads": dict(active_heads=7, shared_heads=4, router="learned"),
    },
    "dha": {
        f"{name}, budget {budget}": dict(kv_budget=budget, **options)
        for budget in (0.6667, 0.3334)
        for name, options in {
            "mean-pool": dict(fusion="mean"),
            "optimal fusion": dict(),
            "optimal fusion + refine 30": dict(refine_steps=30),
        }.items()
    },
    "deci": {
        f"{name}, budget {label}": dict(to="dha", kv_budget=budget, **options)
        for budget, label in ((1 / 2, "1/2"), (1 / 3, "1/3"))
        for name, options in {
            "free DHA plan": dict(),
            "deci export": dict(export="deci"),
            "uniform": dict(uniform=True),
        }.items()
        if not (options.get("uniform") and budget == 1 / 2)  # 1.5 of SmolLM2's 3 KV heads: no uniform count
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("layout", choices=sorted(VARIANTS))
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--texts", nargs="+", default=["shakespeare-heldout", "pydoc"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())

    source = builtin.model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(source)
    blocks = {name: text.blocks(tokenizer, name, args.eval_tokens, 512) for name in args.texts}

    def score(folder: Path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return {name: round(metrics.perplexity(model, b), 3) for name, b in blocks.items()}

    rows = {"original": {**score(source), "convert_seconds": None}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in VARIANTS[args.layout].items():
            start = time.perf_counter()
            out = convert("smollm2-135m", Path(tmp) / "out", calib_tokens=args.calib_tokens, overwrite=True,
                          **{"to": args.layout, **options})
            seconds = round(time.perf_counter() - start, 1)
            plan = Provenance.load(out).plan
            rows[name] = {**score(out), "convert_seconds": seconds, "plan": plan}
            print(name, {k: v for k, v in rows[name].items() if k != "plan"}, flush=True)

    base = rows["original"]
    print("\n| variant | " + " | ".join(f"{t} ppl | ×" for t in args.texts) + " | convert s |")
    print("|---|" + "---|---|" * len(args.texts) + "---|")
    for name, row in rows.items():
        cells = " | ".join(f"{row[t]:.2f} | {row[t] / base[t]:.2f}" for t in args.texts)
        print(f"| {name} | {cells} | {row['convert_seconds'] or ''} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "args": {**vars(args), "json": str(args.json)}, "rows": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
