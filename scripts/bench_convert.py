"""Conversion cost on a synthetic Llama-shaped sharded checkpoint: wall time and peak RSS.

For each size (a number of decoder layers at a fixed Llama-3.2-1B width) it writes a random bf16
checkpoint in 1 GiB shards, then times, each in its own process so that peak RSS is that
process's alone:
  - ``cp -r`` of the folder (the floor: read everything once, write everything once);
  - ``rehead convert --to mha`` (Llama-3.2-1B is GQA: K/V grow 4x) and ``--to moh`` without
    calibration, ``--to moh`` calibrated on --calib-tokens tokens, ``--to dha --kv-budget 0.25``
    (planning pass, conversion pass, both calibrated) and ``--to mla --kv-budget 0.25`` (one calibrated
    pass: the shared RoPE key and the whitened latent per layer);
  - transformers ``from_pretrained`` + ``save_pretrained`` of the same folder.

    python scripts/bench_convert.py --layers 4 8 16 --json runs/bench_convert.json

16 layers is Llama-3.2-1B's shape (1.24B parameters). ``--real`` measures smollm2-135m to DHA and to MLA
at half its KV cache with the CLI's defaults instead. Results go to BENCHMARKS.md by hand.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DHA_TOKENS = 4608  # DHA's statistics need twice the hidden size (2048) plus one: 9 blocks of 512
WIDTH = dict(hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256)


def synthetic_checkpoint(folder: Path, layers: int) -> int:
    """A random bf16 Llama checkpoint with an untied head, written shard by shard; returns parameters."""
    import torch

    from rehead.checkpoint import ShardWriter

    folder.mkdir(parents=True)
    w, gen = WIDTH, torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, max_shard_bytes=1 << 30)
    count = 0

    def add(name, *shape):
        nonlocal count
        tensor = (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, tensor)
        count += tensor.numel()

    add("model.embed_tokens.weight", w["vocab"], w["hidden"])
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", w["heads"] * w["head_dim"], w["hidden"])
        add(p + "self_attn.k_proj.weight", w["kv_heads"] * w["head_dim"], w["hidden"])
        add(p + "self_attn.v_proj.weight", w["kv_heads"] * w["head_dim"], w["hidden"])
        add(p + "self_attn.o_proj.weight", w["hidden"], w["heads"] * w["head_dim"])
        add(p + "mlp.gate_proj.weight", w["intermediate"], w["hidden"])
        add(p + "mlp.up_proj.weight", w["intermediate"], w["hidden"])
        add(p + "mlp.down_proj.weight", w["hidden"], w["intermediate"])
        add(p + "input_layernorm.weight", w["hidden"])
        add(p + "post_attention_layernorm.weight", w["hidden"])
    add("model.norm.weight", w["hidden"])
    add("lm_head.weight", w["vocab"], w["hidden"])
    writer.finish()
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": w["hidden"],
        "intermediate_size": w["intermediate"], "num_hidden_layers": layers, "num_attention_heads": w["heads"],
        "num_key_value_heads": w["kv_heads"], "head_dim": w["head_dim"], "vocab_size": w["vocab"],
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "dtype": "bfloat16",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return count


def measure_median(cmd: list[str], repeat: int, cleanup: Path) -> dict:
    """The median wall time and the largest peak RSS of ``repeat`` runs."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(cleanup, ignore_errors=True)
        runs.append(measure(cmd))
    shutil.rmtree(cleanup, ignore_errors=True)
    seconds = sorted(r["seconds"] for r in runs)[len(runs) // 2]
    return {"seconds": seconds, "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def measure(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of one child process.

    ru_maxrss counts what a child inherited at fork, so this parent process stays small: it never
    imports torch, and the synthetic checkpoint is made by a child of its own.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    return {"seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


HF_ROUND_TRIP = (
    "import sys, torch; from transformers import AutoModelForCausalLM; "
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16); m.save_pretrained(sys.argv[2])"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--calib-tokens", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command (median time, max RSS)")
    parser.add_argument("--only", nargs="+", help="run only the commands whose names match one of these regexes")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--real", action="store_true", help="smollm2-135m to DHA and to MLA at half the KV cache, "
                                                                "with the CLI's defaults, instead of --layers")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)  # internal: write one checkpoint and exit
    args = parser.parse_args()
    if args.make:
        print(synthetic_checkpoint(args.make, args.layers[0]))
        return

    rehead = [sys.executable, "-m", "rehead"]
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"), "rows": []}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rehead-bench-"))
    try:
        if args.real:  # the real model with each calibrated layout's CLI defaults (8,192 calibration tokens)
            row = {"model": "smollm2-135m"}
            for name, options in {"convert --to dha --kv-budget 0.5": ["--to", "dha", "--kv-budget", "0.5"],
                                  "convert --to mla --kv-budget 0.5": ["--to", "mla", "--kv-budget", "0.5"]}.items():
                out = work / name.split()[2]
                row[name] = measure_median(rehead + ["convert", "smollm2-135m", str(out), *options], args.repeat, out)
                print(f"smollm2-135m  {name:<48} {row[name]}", flush=True)
            results["rows"].append(row)
        for layers in [] if args.real else args.layers:
            src = work / f"src-{layers}"
            make = [sys.executable, __file__, "--make", str(src), "--layers", str(layers)]
            params = int(subprocess.run(make, check=True, capture_output=True, text=True).stdout.split()[-1])
            size = sum(f.stat().st_size for f in src.iterdir())
            row = {"layers": layers, "parameters": params, "bytes": size}
            runs = {
                "cp -r": ["cp", "-r", str(src), str(work / "copy")],
                "convert --to mha": rehead + ["convert", str(src), str(work / "mha"), "--to", "mha"],
                "convert --to moh": rehead + ["convert", str(src), str(work / "moh"), "--to", "moh", "--shared", "first"],
                f"convert --to moh, calibrated on {args.calib_tokens} tokens": rehead + [
                    "convert", str(src), str(work / "moh-cal"), "--to", "moh", "--tokenizer", "smollm2-135m",
                    "--calib-tokens", str(args.calib_tokens)],
                f"convert --to dha --kv-budget 0.25, calibrated on {DHA_TOKENS} tokens": rehead + [
                    "convert", str(src), str(work / "dha"), "--to", "dha", "--kv-budget", "0.25",
                    "--tokenizer", "smollm2-135m", "--calib-tokens", str(DHA_TOKENS)],
                f"convert --to mla --kv-budget 0.25, calibrated on {DHA_TOKENS} tokens": rehead + [
                    "convert", str(src), str(work / "mla"), "--to", "mla", "--kv-budget", "0.25",
                    "--tokenizer", "smollm2-135m", "--calib-tokens", str(DHA_TOKENS)],
                "from_pretrained + save_pretrained": [sys.executable, "-c", HF_ROUND_TRIP, str(src), str(work / "hf")],
            }
            runs = {name: cmd for name, cmd in runs.items() if not args.only or any(re.fullmatch(o, name) for o in args.only)}
            for name, cmd in runs.items():
                out = Path(cmd[-1] if name.startswith(("cp", "from_pretrained")) else cmd[cmd.index(str(src)) + 1])
                row[name] = measure_median(cmd, args.repeat, out)
                print(f"{layers:>3} layers  {params / 1e9:5.2f}B  {name:<48} {row[name]}", flush=True)
            results["rows"].append(row)
            shutil.rmtree(src)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
