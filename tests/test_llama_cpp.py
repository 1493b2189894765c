"""A real external client serves the DeciLM export and a DeepSeek-V3 checkpoint: llama.cpp, through
llama-cpp-python. ``check_deepseek_v3_in_llama_cpp`` takes any DeepSeek-V3 checkpoint folder.

Runs wherever llama_cpp is importable (``pip install llama-cpp-python`` builds llama.cpp from
source); the GGUF converter is the one vendored in the sdist of the installed version (see
scripts/llama_cpp_gguf.py; $REHEAD_LLAMA_CPP names another llama.cpp tree).
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_json

from rehead import metrics, models, text
from rehead.convert import convert

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python: it builds llama.cpp from "
                        "source, about 25 minutes on 2 cores)")
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from bench_llama_cpp import KV_LINE  # noqa: E402  (scripts/ is not a package)
from llama_cpp_gguf import llama_cpp_tree, perplexity, to_gguf  # noqa: E402
from test_vllm import random_deepseek_v3, shakespeare_blocks, torch_perplexity  # noqa: E402

TOKENS, SEQ_LEN = 1024, 512


@pytest.fixture(scope="module")
def tree():
    try:
        return llama_cpp_tree()
    except (SystemExit, subprocess.CalledProcessError) as e:
        pytest.skip(f"no llama.cpp converter: {e} (set REHEAD_LLAMA_CPP to a llama.cpp source tree)")


def llama_cpp_perplexity(path: Path, blocks: torch.Tensor, flash_attn: bool) -> float:
    """llama.cpp's perplexity on exactly these token ids, every block scored on its own."""
    llm = llama_cpp.Llama(str(path), n_ctx=SEQ_LEN, n_batch=SEQ_LEN, logits_all=True, flash_attn=flash_attn,
                          n_threads=2, verbose=False)
    try:
        return perplexity(llm, blocks)
    finally:
        llm.close()


def kv_cache_mib(path: Path, n_ctx: int) -> tuple[float, float]:
    """The K and V MiB llama.cpp allocates for ``n_ctx`` tokens (its own log line, from its stderr)."""
    script = (f"import llama_cpp; llama_cpp.Llama({str(path)!r}, n_ctx={n_ctx}, n_batch=512, flash_attn=True, "
              "n_threads=2, verbose=True).close()")
    log = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stderr
    match = KV_LINE.search(log)
    assert match, log[-2000:]
    return float(match.group(2)), float(match.group(4))


def check_deepseek_v3_in_llama_cpp(folder: Path, work: Path, blocks: torch.Tensor, tree: Path) -> dict:
    """llama.cpp's converter and runtime take the DeepSeek-V3 checkpoint ``folder`` (f32 GGUF) as MLA: its KV
    cache holds one f16 latent + rope vector per token and layer, no V. Returns its perplexity on ``blocks``
    beside transformers' (the caller holds them to 1%)."""
    config = read_json(folder / "config.json")
    path = to_gguf(folder, work / "deepseek.gguf", "f32", tree)
    k, v = kv_cache_mib(path, SEQ_LEN)
    latent = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    assert v == 0, (k, v)
    per_token = k * 2**20 / (SEQ_LEN * config["num_hidden_layers"])  # the log gives MiB to 2 decimals
    assert abs(per_token - 2 * latent) < 1, (k, latent)
    return {"served": llama_cpp_perplexity(path, blocks, flash_attn=True),
            "expected": torch_perplexity(folder, blocks), "kv_bytes_per_token_per_layer": round(per_token)}


def test_random_deepseek_v3_with_a_plain_query_runs_in_llama_cpp(tmp_path, tree):
    # 30 layers: llama.cpp requires the q_lora_rank key there, which its converter omits for null
    folder = random_deepseek_v3(tmp_path / "ckpt", layers=30)
    figures = check_deepseek_v3_in_llama_cpp(folder, tmp_path, shakespeare_blocks(folder), tree)
    assert figures["kv_bytes_per_token_per_layer"] == 1152
    assert abs(figures["served"] / figures["expected"] - 1) < 0.01, figures


@pytest.mark.real
def test_deci_export_runs_in_llama_cpp_with_its_per_layer_kv_heads(smollm2, tmp_path, tree):
    import gguf

    # the format is under test, not the plan's quality: no refinement steps (they change values, not shapes)
    out = convert(smollm2, tmp_path / "deci", to="dha", kv_budget=0.5, export="deci", calib_tokens=2048, refine_steps=0)
    kv_heads = read_json(out / "rehead.json")["plan"]["key_heads_per_layer"]
    assert set(kv_heads) == {1, 3}  # SmolLM2's 3 KV heads allow 3 or 1 per layer
    path = to_gguf(out, tmp_path / "deci.gguf", "f32", tree)

    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        values = [f.parts[i].tolist() for i in f.data]
        return values if len(values) > 1 else values[0]

    assert bytes(field("general.architecture")).decode() == "deci"
    assert [v[0] for v in field("deci.attention.head_count_kv")] == kv_heads
    assert [v[0] for v in field("deci.attention.head_count")] == [9] * 30
    assert [v[0] for v in field("deci.feed_forward_length")] == [1536] * 30
    assert [t.shape.tolist() for t in reader.tensors if t.name == "blk.0.attn_k.weight"] == [[576, 64 * kv_heads[0]]]

    model, tokenizer, _ = models.load(str(out))
    blocks = text.blocks(tokenizer, "shakespeare-heldout", TOKENS, SEQ_LEN)
    expected = metrics.perplexity(model, blocks)
    for flash_attn in (True, False):  # without flash attention llama.cpp pads the V cache to the widest layer
        served = llama_cpp_perplexity(path, blocks, flash_attn)
        assert abs(served / expected - 1) < 0.01, (flash_attn, served, expected)


@pytest.mark.real
def test_mla_export_runs_in_llama_cpp_with_its_latent_cache(smollm2, tmp_path, tree):
    out = convert(smollm2, tmp_path / "mla", to="mla", kv_budget=0.5, calib_tokens=2048, refine_steps=0)  # the format
    config = read_json(out / "config.json")
    _, tokenizer, _ = models.load(str(out))
    blocks = text.blocks(tokenizer, "shakespeare-heldout", TOKENS, SEQ_LEN)
    figures = check_deepseek_v3_in_llama_cpp(out, tmp_path, blocks, tree)
    # half of SmolLM2's 2·3·64 K/V values a token and layer, in f16
    assert figures["kv_bytes_per_token_per_layer"] == 2 * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) == 384
    assert abs(figures["served"] / figures["expected"] - 1) < 0.01, figures
