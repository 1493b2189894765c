"""llama.cpp serving rehead's exports next to their source: perplexity, KV-cache memory, decode speed.

    python scripts/bench_llama_cpp.py --deci runs/deci-50 --json runs/bench_llama_cpp.json
    python scripts/bench_llama_cpp.py --export mla=runs/mla-half deci=runs/deci-50 --json runs/bench_llama_cpp.json

Every export is a DHA DeciLM (``--export deci``) or an MLA DeepSeek-V3 (``--to mla``) checkpoint. All
checkpoints go to GGUF with llama.cpp's own converter (scripts/llama_cpp_gguf.py) and run in
llama-cpp-python on the CPU:
- perplexity of the f32 GGUF in llama.cpp and of the checkpoint in torch, on the same token ids;
- the KV cache llama.cpp allocates (its own log line) for an f16 GGUF, with flash attention on
  and off: without it llama.cpp stores V transposed and pads every layer's V cache to the widest
  layer (llama-kv-cache.cpp), so a per-layer saving shows only in K; an MLA export caches its
  latent and RoPE key in K and nothing in V;
- decode tokens/s after a --contexts-token prompt of held-out text, flash attention on, f16,
  --threads threads; the median over --repeat rounds, source and export interleaved.

On a shared CPU, keep one thread: llama.cpp's OpenMP threads wait for each other at every
barrier, and with more runnable processes than cores a decode step can take 20× longer (2 tok/s
instead of 37 for SmolLM2-135M on CPU-2 at load 10). OMP_WAIT_POLICY=PASSIVE is set unless given.
The stock-Llama conversion of the source needs sentencepiece (llama.cpp's converter imports it).
"""

import argparse
import contextlib
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when llama.cpp's OpenMP runtime loads
sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_gguf import llama_cpp_tree, to_gguf  # noqa: E402
from llama_cpp_gguf import perplexity as llama_cpp_perplexity  # noqa: E402

KV_LINE = re.compile(r"K \((\w+)\):\s+([\d.]+) MiB, V \((\w+)\):\s+([\d.]+) MiB")


def open_model(path: Path, n_ctx: int, flash_attn: bool, threads: int, **kwargs):
    """(Llama, the KV cache's K and V MiB from llama.cpp's log)."""
    import llama_cpp

    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, flash_attn=flash_attn, n_threads=threads,
                              n_threads_batch=threads, verbose=True, **kwargs)
    match = KV_LINE.search(log.getvalue())
    return llm, (float(match.group(2)), float(match.group(4))) if match else None


def perplexity(path: Path, blocks: torch.Tensor, threads: int) -> float:
    llm, _ = open_model(path, blocks.shape[1], True, threads, logits_all=True)
    try:
        return llama_cpp_perplexity(llm, blocks)
    finally:
        llm.close()


def decode_speed(path: Path, ids: list[int], context: int, new: int, threads: int) -> float:
    llm, _ = open_model(path, context + new, True, threads)
    llm.eval(ids[:context])
    started = time.perf_counter()
    for token in ids[context : context + new]:
        llm.eval([token])
    seconds = time.perf_counter() - started
    llm.close()
    return new / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deci", help="a `rehead convert --to dha --export deci` checkpoint")
    parser.add_argument("--export", nargs="+", default=[], metavar="NAME=FOLDER",
                        help="exports to run beside the source, each named (e.g. mla=runs/mla-half)")
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--new", type=int, default=64, help="decoded tokens per measurement")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if any("=" not in e for e in args.export):
        parser.error(f"--export {' '.join(args.export)}: give each export as NAME=FOLDER (e.g. mla=runs/mla-half)")
    exports = {**({"deci": args.deci} if args.deci else {}), **dict(e.split("=", 1) for e in args.export)}
    if not exports or any(not name or name == "source" for name in exports):
        parser.error("give the exports to run: --deci FOLDER and/or --export NAME=FOLDER (a name other than 'source')")

    import llama_cpp

    from rehead import metrics, models, text
    from rehead.sources import resolve

    tree = llama_cpp_tree()
    checkpoints = {"source": resolve(args.source).path, **{name: Path(f) for name, f in exports.items()}}
    results = {name: {} for name in checkpoints}
    with tempfile.TemporaryDirectory() as tmp:
        ggufs = {}
        for name, folder in checkpoints.items():
            ggufs[name] = {t: to_gguf(folder, Path(tmp) / f"{name}-{t}.gguf", t, tree) for t in ("f32", "f16")}
            model, tokenizer, _ = models.load(str(folder))
            blocks = text.blocks(tokenizer, "shakespeare-heldout", args.ppl_tokens, 512)
            results[name]["torch_ppl"] = round(metrics.perplexity(model, blocks), 4)
            results[name]["llama_cpp_ppl_f32"] = round(perplexity(ggufs[name]["f32"], blocks, args.threads), 4)
            longest = max(args.contexts) + args.new
            ids = text.blocks(tokenizer, "shakespeare-heldout", longest, longest)
            results[name]["ids"] = ids[0].tolist()
            for flash_attn in (True, False):
                llm, (k, v) = open_model(ggufs[name]["f16"], max(args.contexts), flash_attn, args.threads)
                llm.close()
                key = f"kv_mib_f16_ctx{max(args.contexts)}_flash_{'on' if flash_attn else 'off'}"
                results[name][key] = {"K": k, "V": v}
            del model
            print(name, {k: v for k, v in results[name].items() if k != "ids"}, flush=True)
        speeds = {(name, c): [] for name in checkpoints for c in args.contexts}
        for _ in range(args.repeat):
            for context in args.contexts:
                for name in checkpoints:
                    speeds[(name, context)].append(decode_speed(ggufs[name]["f16"], results[name]["ids"], context,
                                                                args.new, args.threads))
    for (name, context), values in speeds.items():
        results[name][f"decode_tok_s_ctx{context}"] = round(statistics.median(values), 2)
        results[name][f"decode_tok_s_ctx{context}_runs"] = [round(v, 2) for v in values]
    for name in checkpoints:
        results[name].pop("ids")
    print(json.dumps(results, indent=1))
    for name in exports:
        for context in args.contexts:
            ratio = results[name][f"decode_tok_s_ctx{context}"] / results["source"][f"decode_tok_s_ctx{context}"]
            print(f"context {context}: {name} export decodes at {ratio:.3f}× the source's tokens/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "llama_cpp_python": llama_cpp.__version__, "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "args": {**vars(args), "json": str(args.json)},
            "results": results,
        }, indent=2))


if __name__ == "__main__":
    main()
