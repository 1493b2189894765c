"""The embedded real model, SmolLM2-135M-Instruct (30 layers, 9 query heads, 3 KV heads)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead import builtin, metrics, text
from rehead.convert import convert
from rehead.describe import describe

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def heldout(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return text.blocks(tokenizer, "shakespeare-heldout", 1024, 256)


def run(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_builtin_model_is_smollm2(smollm2):
    info = describe(smollm2)
    assert (info["layers"], info["query_heads"], info["key_heads_per_layer"][0], info["head_dim"]) == (30, 9, 3, 64)
    assert info["parameters"] == 134_515_008


def test_moh_identity_on_the_real_model(smollm2, tmp_path, heldout):
    out = convert("smollm2-135m", tmp_path / "moh", to="moh", active_heads=9, shared_heads=4)
    diff = (run(out, heldout[:2]) - run(smollm2, heldout[:2])).abs().max().item()
    assert diff <= 1e-4


def test_mha_reproduces_the_real_model(smollm2, tmp_path, heldout):
    out = convert("smollm2-135m", tmp_path / "mha", to="mha")
    reference = run(smollm2, heldout[:2])
    assert (run(out, heldout[:2]) - reference).abs().max().item() <= 1e-4
    builtin_mha = builtin.model_path("smollm2-135m-mha")
    assert describe(builtin_mha)["key_heads_per_layer"] == [9] * 30
    assert (run(builtin_mha, heldout[:2]) - reference).abs().max().item() <= 1e-4


def test_calibrated_moh_stays_close_on_held_out_text(smollm2, tmp_path, heldout):
    """7 of 9 heads (4 shared + top-3 of 5), training-free: calibrated shared heads keep perplexity within 2x."""
    out = convert("smollm2-135m", tmp_path / "moh", to="moh", active_heads=7, shared_heads=4, calib_tokens=2048)
    base = metrics.perplexity(AutoModelForCausalLM.from_pretrained(smollm2).eval(), heldout)
    moh = metrics.perplexity(AutoModelForCausalLM.from_pretrained(out).eval(), heldout)
    assert base < moh < 2 * base


def test_dha_finds_the_repeated_heads_of_the_mha_form(smollm2, tmp_path, heldout):
    """smollm2-135m-mha repeats each of 3 KV heads 3 times: a third of the heads is the same function."""
    out = convert("smollm2-135m-mha", tmp_path / "dha", to="dha", kv_budget=0.3334, calib_tokens=2048)
    plan = json.loads((out / "rehead.json").read_text())["plan"]
    assert plan["key_heads_per_layer"] == [3] * 30 == plan["value_heads_per_layer"]
    assert (run(out, heldout[:2]) - run(smollm2, heldout[:2])).abs().max().item() <= 1e-3


def test_gda_grow_at_lambda_zero_is_the_real_model(smollm2, tmp_path, heldout):
    out = convert("smollm2-135m", tmp_path / "gda", to="gda", ratio=3)
    assert (run(out, heldout[:2]) - run(smollm2, heldout[:2])).abs().max().item() <= 1e-4


def test_gda_diff_lambda_and_signal_growth_keep_the_real_model(smollm2, tmp_path, heldout):
    """--lambda diff starts at the source; --grow-signal 1 (9 → 12 signal heads over 3 noise heads) too."""
    gda = convert("smollm2-135m", tmp_path / "gda", to="gda", ratio=3, lambda_="diff")
    grown = convert(gda, tmp_path / "grown", to="gda", grow_signal=1)
    assert describe(grown)["query_heads"] == 12
    reference = run(smollm2, heldout[:2])
    assert (run(gda, heldout[:2]) - reference).abs().max().item() <= 1e-4
    # the copies' shares of o_proj add up in another order: float32 rounding, 1.4e-4 here on logits up to 38
    assert (run(grown, heldout[:2]) - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
