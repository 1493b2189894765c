"""Training-free held-out perplexity of smollm2-135m converted to MoH.

Calibration uses the built-in ``shakespeare`` text; perplexity is measured on text calibration
never saw: ``shakespeare-heldout`` (other plays) and ``pydoc`` (Python's reference text).

    python scripts/bench_moh_ppl.py --active-heads 7 --shared-heads 4 --json runs/bench_moh_ppl.json
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

VARIANTS = {
    "query-norm router, first heads shared": dict(shared="first", router="query-norm"),
    "query-norm router, calibrated shared heads": dict(shared="calibrated", router="query-norm"),
    "learned router (fitted), calibrated shared heads": dict(shared="calibrated", router="learned"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--active-heads", type=int, default=7)
    parser.add_argument("--shared-heads", type=int, default=4)
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

    rows = {"original (all 9 heads)": {**score(source), "convert_seconds": None}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, values in VARIANTS.items():
            start = time.perf_counter()
            out = convert("smollm2-135m", Path(tmp) / name.replace(" ", "_"), to="moh",
                          active_heads=args.active_heads, shared_heads=args.shared_heads,
                          calib_tokens=args.calib_tokens, **values)
            seconds = round(time.perf_counter() - start, 1)
            rows[name] = {**score(out), "convert_seconds": seconds}
            print(name, rows[name], flush=True)

    base = rows["original (all 9 heads)"]
    header = " | ".join(f"{t} ppl | ×" for t in args.texts)
    print(f"\n| variant ({args.active_heads} of 9 heads: {args.shared_heads} shared + top-"
          f"{args.active_heads - args.shared_heads}) | {header} |")
    print("|---|" + "---|---|" * len(args.texts))
    for name, row in rows.items():
        cells = " | ".join(f"{row[t]:.2f} | {row[t] / base[t]:.2f}" for t in args.texts)
        print(f"| {name} | {cells} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "args": vars(args) | {"json": str(args.json)}, "rows": rows,
        }, indent=2))


if __name__ == "__main__":
    main()
