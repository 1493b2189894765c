"""Training-free held-out perplexity of smollm2-135m's conversions, calibrated on each candidate text,
on the held-out texts of three kinds (rehead.text.HELDOUT_TEXTS), as multiples of the source's.

Each (calibration, variant) row is converted, scored and saved as JSON under WORK/rows/, so the
script resumes where it stopped and rows can be added later; ``--table`` prints the Markdown table
of every saved row.

    python scripts/bench_general.py --calib shakespeare shakespeare,pydoc self self,shakespeare,pydoc \
        --variants moh dha-2/3 dha-1/3 --work runs/bench_general
    python scripts/bench_general.py --work runs/bench_general --table
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead import builtin, metrics, text
from rehead.app.pipeline import presets
from rehead.convert import convert
from rehead.provenance import Provenance

VARIANTS = {
    "moh": presets()["moh"],  # the pipeline's: learned router, 7 of 9 heads, 4 shared
    "moh-query-norm": dict(to="moh", router="query-norm"),  # the released MoH-LLaMA3-8B's router, shared calibrated
    "moh-learned": dict(to="moh", router="learned"),
    "dha-2/3": dict(to="dha", kv_budget=0.6667),
    "dha-1/3": dict(to="dha", kv_budget=0.3334),
    "dha-2/3-refine": dict(to="dha", kv_budget=0.6667, refine_steps=30),
    "dha-1/3-refine": dict(to="dha", kv_budget=0.3334, refine_steps=30),
    "dha-2/3-logits": dict(to="dha", kv_budget=0.6667, allocation="logits"),
    "dha-1/3-logits": dict(to="dha", kv_budget=0.3334, allocation="logits"),
    "dha-2/3-logits-refine": dict(to="dha", kv_budget=0.6667, allocation="logits", refine_steps=30),
    "dha-1/3-logits-refine": dict(to="dha", kv_budget=0.3334, allocation="logits", refine_steps=30),
    "dha-2/3-logits-refine100": dict(to="dha", kv_budget=0.6667, allocation="logits", refine_steps=100),
    "dha-1/3-refine100": dict(to="dha", kv_budget=0.3334, refine_steps=100),
    # MLA at half the cache (192 of 384 cached values per token and layer), split between the latent and the RoPE key
    "mla-1/2": dict(to="mla", kv_budget=0.5),  # rank 160 + rope 32 (head_dim / 2)
    "mla-1/2-rope16": dict(to="mla", kv_budget=0.5, rope_dim=16),  # rank 176 + rope 16
    "mla-1/2-rope64": dict(to="mla", kv_budget=0.5, rope_dim=64),  # rank 128 + rope 64
    "mla-rank384-rope32": dict(to="mla", kv_rank=384, rope_dim=32),  # a full-rank latent: the RoPE key's cost alone
    "mla-1/3": dict(to="mla", kv_budget=0.3334),  # rank 96 + rope 32
    "mla-1/3-rope64": dict(to="mla", kv_budget=0.3334, rope_dim=64),  # rank 64 + rope 64
    "dha-1/2": dict(to="dha", kv_budget=0.5),
    "dha-1/2-deci": dict(to="dha", kv_budget=0.5, export="deci"),
    "dha-1/3-deci": dict(to="dha", kv_budget=0.3334, export="deci"),
    # vLLM's CPU MLA shape (512 + 64 = 576 cached values: half of the 9-KV-head twin's 1,152), and DHA at those bytes
    "mla-512+64-mha": dict(source="smollm2-135m-mha", to="mla", kv_rank=512, rope_dim=64),
    "dha-1/2-mha": dict(source="smollm2-135m-mha", to="dha", kv_budget=0.5),
}
AIMS = {name: 1.3 if name.startswith("moh") else 2.5 if name.startswith("mla-1/3") else 1.4 if name.startswith("mla")
        else 1.5 if "2/3" in name else 5.0 for name in VARIANTS}


def slug(*names: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", "__".join(names)).strip("_")


def score(folder: Path, tokenizer, eval_tokens: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {kind: round(metrics.perplexity(model, text.blocks(tokenizer, kind, eval_tokens, 512)), 3)
            for kind in text.HELDOUT_TEXTS}


def run(args, source: Path, tokenizer) -> None:
    rows = args.work / "rows"
    rows.mkdir(parents=True, exist_ok=True)
    setting = {"calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens, "machine": platform.node(),
               "cores": os.cpu_count(), "torch": torch.__version__}
    if not (rows / "source.json").is_file():
        start = time.perf_counter()
        ppl = score(source, tokenizer, args.eval_tokens)
        (rows / "source.json").write_text(json.dumps({"ppl": ppl, "score_seconds": round(time.perf_counter() - start),
                                                      **setting}, indent=1))
    for calib in args.calib:
        for variant in args.variants:
            path = rows / f"{slug(calib, variant)}.json"
            if path.is_file():
                continue
            options = dict(VARIANTS[variant])
            start = time.perf_counter()
            out = convert(options.pop("source", "smollm2-135m"), args.work / "model", calib=calib,
                          calib_tokens=args.calib_tokens, overwrite=True, **options)
            seconds = round(time.perf_counter() - start, 1)
            plan = Provenance.load(out).plan
            ppl = score(out, tokenizer, args.eval_tokens)
            row = {"calib": calib, "variant": variant, "options": VARIANTS[variant], "ppl": ppl, "convert_seconds": seconds,
                   "date": time.strftime("%Y-%m-%d %H:%M"), "plan": plan, **setting}
            path.write_text(json.dumps(row, indent=1))
            shutil.rmtree(out)
            print(calib, variant, ppl, f"{seconds} s", flush=True)


def table(work: Path) -> str:
    rows = work / "rows"
    base = json.loads((rows / "source.json").read_text())["ppl"]
    kinds = list(text.HELDOUT_TEXTS)
    lines = [f"| calibration | variant | {' | '.join(kinds)} | geo-mean | worst | aim | convert s |",
             "|---|---|" + "---:|" * (len(kinds) + 4)]
    lines.append(f"| (source) | | {' | '.join(f'{base[k]:.2f}' for k in kinds)} | | | | |")
    found = [json.loads(p.read_text()) for p in sorted(rows.glob("*.json")) if p.name != "source.json"]
    for row in sorted(found, key=lambda r: (list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else 99,
                                            r["calib"])):
        ratios = [row["ppl"][k] / base[k] for k in kinds]
        worst = max(ratios)
        geo = math.prod(ratios) ** (1 / len(ratios))
        aim = AIMS.get(row["variant"])
        mark = "" if aim is None else (" ✓" if worst <= aim else f" (+{worst - aim:.2f})")
        lines.append(f"| `{row['calib']}` | {row['variant']} | "
                     + " | ".join(f"{row['ppl'][k]:.2f} (×{r:.2f})" for k, r in zip(kinds, ratios))
                     + f" | ×{geo:.2f} | ×{worst:.2f}{mark} | {aim or ''} | {row['convert_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", nargs="+", default=["shakespeare", "shakespeare,pydoc", "self",
                                                         "self,shakespeare,pydoc"])
    parser.add_argument("--variants", nargs="+", default=["dha-2/3", "dha-1/3", "moh"], choices=list(VARIANTS))
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_general"))
    parser.add_argument("--table", action="store_true", help="print the table of the saved rows and stop")
    args = parser.parse_args()
    if args.table:
        print(table(args.work), end="")
        return
    torch.set_num_threads(os.cpu_count())
    source = builtin.model_path("smollm2-135m")
    run(args, source, AutoTokenizer.from_pretrained(source))
    print(table(args.work), end="")


if __name__ == "__main__":
    main()
