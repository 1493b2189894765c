"""GDA's group-differentiated growth: a GDA checkpoint gains signal heads, copies of its own, same function."""

import json

import pytest
import torch
from conftest import logits, read_json
from safetensors.torch import load_file, save_file
from test_convert import run_cli
from transformers import AutoModelForCausalLM

from rehead.convert import convert
from rehead.convert.gda_growth import grow_signal_heads, uneven_shares
from rehead.errors import ReheadError

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def gda_source(tiny, tmp_path, variant="gqa", ratio=3, **options):
    """A GDA checkpoint with λ, noise heads and sub-norm moved away from their starting values (as after
    training), so that a copy that dropped any of them would show in the logits."""
    out = convert(tiny(variant), tmp_path / f"gda-{variant}-{ratio}", to="gda", ratio=ratio, **options)
    path = out / "model.safetensors"
    weights = load_file(path)
    generator = torch.Generator().manual_seed(1)
    for name, tensor in weights.items():
        if any(part in name for part in ("diff_lambda", "lambda_q", "lambda_k", "subln", "noise.")):
            weights[name] = tensor + 0.3 * torch.randn(tensor.shape, generator=generator)
    save_file(weights, path, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "variant, ratio, added, options",
    [
        ("gqa", 3, 1, {}),  # noise groups = KV groups of 3
        ("gqa", 3, 4, {}),  # more copies than heads: each head copied once or twice
        ("gqa", 6, 2, {}),  # one noise group spans 2 KV heads: one copy per KV head
        ("gqa", 1, 1, {}),  # a noise head per signal head, 3 per KV group
        ("mha", 2, 2, {}),  # MHA: the copies make it grouped-query
        ("odd", 9, 3, {"lambda": "diff", "subln": True}),
        ("qwen2", 2, 1, {"lambda": "diff"}),
    ],
)
def test_growth_computes_the_source_function(tiny, tmp_path, calib_file, variant, ratio, added, options):
    src = gda_source(tiny, tmp_path, variant, ratio, **options)
    before = read_json(src / "config.json")
    out = convert(src, tmp_path / "grown", to="gda", grow_signal=added, check_identity=True, calib=str(calib_file),
                  calib_tokens=256, calib_seq_len=128)
    after, plan = read_json(out / "config.json"), read_json(out / "rehead.json")["plan"]
    noise = before["gda_noise_heads"]
    assert after["num_attention_heads"] == before["num_attention_heads"] + added * noise
    for same in ("gda_noise_heads", "num_key_value_heads", "gda_lambda", "gda_lambda_init", "gda_subln", "head_dim"):
        assert after[same] == before[same]
    assert plan["mode"] == "grow-signal" and len(plan["copy_of"]) == after["num_attention_heads"]
    assert max(read_json(out / "rehead.json")["identity_error_per_layer"]) < 1e-5
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


def test_copies_take_their_originals_rows_and_share_its_columns(tiny, tmp_path):
    src = gda_source(tiny, tmp_path, "gqa", 3)  # 6 signal heads, 2 KV heads, 2 noise heads, head_dim 8
    out = convert(src, tmp_path / "grown", to="gda", grow_signal=2)
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    copy_of = read_json(out / "rehead.json")["plan"]["copy_of"]
    assert copy_of == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    prefix = "model.layers.1.self_attn."
    q, q_grown = a[prefix + "q_proj.weight"].unflatten(0, (6, 8)), b[prefix + "q_proj.weight"].unflatten(0, (10, 8))
    o, o_grown = a[prefix + "o_proj.weight"].unflatten(1, (6, 8)), b[prefix + "o_proj.weight"].unflatten(1, (10, 8))
    assert torch.equal(q_grown, q[copy_of])
    assert torch.equal(b[prefix + "diff_lambda"], a[prefix + "diff_lambda"][copy_of])
    torch.testing.assert_close(o_grown[:, 0], o[:, 0] * 2 / 3)
    torch.testing.assert_close(o_grown[:, 1], o[:, 0] / 3)
    torch.testing.assert_close(o_grown[:, 4], o[:, 2])  # not copied: all of its columns
    for name in ("k_proj.weight", "v_proj.weight", "noise.q_proj.weight", "noise.k_proj.weight"):
        assert torch.equal(a[prefix + name], b[prefix + name])  # KV and noise heads are not grown


def test_copies_diverge_from_their_originals_in_training(tiny, tmp_path):
    """Equal halves of o_proj would give a copy and its original equal gradients for ever; the uneven
    shares let Adam move them apart from the second step."""
    out = convert(gda_source(tiny, tmp_path, "gqa", 3), tmp_path / "grown", to="gda", grow_signal=1)
    model = AutoModelForCausalLM.from_pretrained(out).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    q = model.model.layers[0].self_attn.q_proj.weight.unflatten(0, (8, 8))
    assert (q[0] - q[1]).abs().max() > 1e-4  # head 1 is head 0's copy


def test_shares_sum_to_one_and_are_uneven():
    for count in range(1, 6):
        shares = uneven_shares(count)
        assert sum(shares) == pytest.approx(1) and len(set(shares)) == count
    # MHA, 3 KV heads per noise group: 3 added heads are one copy per KV head, each read by 2 heads now
    assert grow_signal_heads(6, 6, 2, 3)[0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_the_cli_converts_with_diff_lambda_then_grows(tiny, tmp_path, capsys):
    code, _ = run_cli(capsys, "convert", tiny("gqa"), tmp_path / "gda", "--to", "gda", "--ratio", "3",
                      "--lambda", "diff", "--subln")
    assert code == 0 and read_json(tmp_path / "gda" / "rehead.json")["options"]["lambda"] == "diff"
    code, _ = run_cli(capsys, "convert", tmp_path / "gda", tmp_path / "grown", "--to", "gda", "--grow-signal", "1")
    config = read_json(tmp_path / "grown" / "config.json")
    assert code == 0 and config["num_attention_heads"] == 8 and config["gda_lambda"] == "diff"
    code, err = run_cli(capsys, "convert", tmp_path / "gda", tmp_path / "bad", "--to", "gda", "--grow-signal", "1",
                        "--lambda", "plain")
    assert code == 2 and "drop --lambda" in err


@pytest.mark.parametrize(
    "variant, ratio, options, message",
    [
        ("gqa", 6, dict(grow_signal=1), (
            "--grow-signal 1: each noise group of 6 signal heads spans 2 KV heads, and copies read their original's "
            "KV head, which must keep as many readers as the others; values that fit: multiples of 2 \\(2, 4, 6, …\\)"
        )),
        ("mha", 2, dict(grow_signal=3), "values that fit: multiples of 2"),
        ("gqa", 3, dict(grow_signal=0), "--grow-signal 0: must be at least 1; values that fit: multiples of 1"),
        ("gqa", 3, dict(), "already a GDA checkpoint: grow its signal heads with --grow-signal N"),
        ("gqa", 3, dict(grow_signal=1, ratio=2, subln=True),
         "keeps the source's noise heads, λ and sub-norm: drop --ratio, --subln"),
        ("gqa", 3, dict(grow_signal=1, lambda_="diff"), "drop --lambda"),
    ],
)
def test_growth_refuses_what_the_grouping_cannot_hold(tiny, tmp_path, variant, ratio, options, message):
    src = gda_source(tiny, tmp_path, variant, ratio)
    with pytest.raises(ReheadError, match=message):
        convert(src, tmp_path / "out", to="gda", **options)
    assert not (tmp_path / "out").exists()


def test_growth_needs_a_gda_source(tiny, tmp_path):
    with pytest.raises(ReheadError, match="--grow-signal 1 grows a GDA checkpoint; this source is a stock llama one"):
        convert(tiny("gqa"), tmp_path / "out", to="gda", grow_signal=1)
    moh = convert(tiny("gqa"), tmp_path / "moh", to="moh", active_heads=6, shared_heads=1)
    with pytest.raises(ReheadError, match="already a rehead moh checkpoint"):
        convert(moh, tmp_path / "out", to="gda", grow_signal=1)
    gda = convert(tiny("gqa"), tmp_path / "gda", to="gda", ratio=3)
    with pytest.raises(ReheadError, match="already a rehead gda checkpoint"):
        convert(gda, tmp_path / "out", to="moh")


def test_a_grown_checkpoint_records_its_gda_source_kv_cache(tiny, tmp_path):
    from rehead.describe import describe

    source = gda_source(tiny, tmp_path)
    out = convert(source, tmp_path / "grown", to="gda", grow_signal=2)
    recorded = json.loads((out / "rehead.json").read_text())["source"]["kv_cache_bytes_per_token_bf16"]
    assert recorded == describe(source)["kv_cache_bytes_per_token_bf16"]  # the noise keys included
    assert describe(out)["kv_cache_bytes_per_token_bf16"] == recorded  # growth adds no KV heads
