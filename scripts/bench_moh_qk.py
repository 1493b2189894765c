"""Where MoH's query-norm router reads the query on a source with per-head q/k norms: before q_norm (rehead's
choice) or after it, and the learned router, on the held-out kinds.

The source is bench_qk_norm.py's twin of smollm2-135m with Qwen3's q/k norms (no real Qwen3 offline; make it
first with ``python scripts/bench_qk_norm.py --work WORK``). Each variant is ``rehead convert --to moh`` with the
CLI's defaults but the router; "after q_norm" scores the same conversion with the router reading the
normalised query (a patch of this script only, not an option of rehead).

    python scripts/bench_moh_qk.py --twin runs/bench_qk_norm/smollm2-135m-qk --work runs/bench_moh_qk
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from bench_general import score  # the held-out kinds' perplexity, as every benchmark scores them
from transformers import AutoTokenizer

from rehead import text
from rehead.convert import convert
from rehead.layouts import modeling_moh
from rehead.layouts.modeling_stack import project


def after_norm(self, hidden_states, position_embeddings):
    """MoHAttention.project_states with the router reading the query after q_norm (and RoPE, which keeps norms)."""
    query, key, value = project(self, hidden_states, position_embeddings)
    gates = None if self.all_active else self.gates(hidden_states, query)
    return query, key, value, gates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--twin", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_moh_qk"))
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    tokenizer = AutoTokenizer.from_pretrained(args.twin)
    rows = {"source": score(args.twin, tokenizer, args.eval_tokens)}
    for router in ("query-norm", "learned"):
        out = convert(args.twin, args.work / router, to="moh", router=router, overwrite=True)
        rows[router] = score(out, tokenizer, args.eval_tokens)
        if router == "query-norm":
            original = modeling_moh.MoHAttention.project_states
            modeling_moh.MoHAttention.project_states = after_norm
            try:
                rows["query-norm, after q_norm"] = score(out, tokenizer, args.eval_tokens)
            finally:
                modeling_moh.MoHAttention.project_states = original
        print(rows, flush=True)
    (args.work / "result.json").write_text(json.dumps({"rows": rows, "date": time.strftime("%Y-%m-%d")}, indent=1))
    kinds = list(text.HELDOUT_TEXTS)
    print(f"| router | {' | '.join(kinds)} |\n|---|" + "---:|" * len(kinds))
    for name, ppl in rows.items():
        print(f"| {name} | " + " | ".join(f"{ppl[k]:.2f} (×{ppl[k] / rows['source'][k]:.2f})" for k in kinds) + " |")


if __name__ == "__main__":
    main()
