"""Qwen3 sources (``Qwen3ForCausalLM``: per-head q/k norms before RoPE, a head_dim of its own) on tiny random
checkpoints built with transformers' own Qwen3Config: every identity setting reproduces the source's logits,
an output in Qwen3's own family is a stock Qwen3 again, the fused keys' closed form holds the norms (identical
heads fuse exactly), and what cannot hold the norms is refused."""

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, byte_tokenizer, load_without_rehead, logits, randomise, read_json
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from rehead.app.cli import main
from rehead.convert import convert
from rehead.describe import describe
from rehead.errors import ReheadError
from rehead.tune import load, tune

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def make_qwen3(folder: Path, kv: int = 4, tied: bool = False, seed: int = 0, duplicate_kv: bool = False,
               **overrides) -> Path:
    """4 heads of head_dim 16 over hidden 32 (heads·head_dim = 64 ≠ hidden, as in Qwen3-0.6B); random
    q/k norm weights, so that a dropped or misplaced norm shows in the logits. ``duplicate_kv``: KV heads
    2m and 2m + 1 identical (keys and values), which a fusion of pairs must reproduce exactly."""
    values = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=kv, head_dim=16,
                  intermediate_size=48, num_hidden_layers=2, max_position_embeddings=512, pad_token_id=256,
                  eos_token_id=256, bos_token_id=None, tie_word_embeddings=tied)
    values.update(overrides)
    torch.manual_seed(seed)
    model = randomise(Qwen3ForCausalLM(Qwen3Config(**values)), also=lambda name: name.endswith(("q_norm.weight",
                                                                                                 "k_norm.weight")))
    if duplicate_kv:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    heads = proj.weight.view(kv, 16, -1)
                    heads[1::2] = heads[0::2]
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


IDENTITY = {
    "mha": dict(to="mha"),
    "moh-all-active": dict(to="moh", active_heads=4, shared_heads=1),
    "dha-budget-1": dict(to="dha", kv_budget=1.0),
    "dha-uniform-mean": dict(to="dha", kv_budget=1.0, uniform=True, fusion="mean"),
    "gda-grow": dict(to="gda", ratio=2),
}
QWEN3_FORM = ("mha", "dha-uniform-mean")  # outputs in the source's own family


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("setting", list(IDENTITY))
def test_identity_settings_reproduce_the_source(tmp_path, setting, kv, tied):
    src = make_qwen3(tmp_path / "src", kv=kv, tied=tied)
    out = convert(src, tmp_path / "out", **IDENTITY[setting])
    config = read_json(out / "config.json")
    names = set(load_file(out / "model.safetensors"))
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"} <= names
    if setting in QWEN3_FORM:  # a stock Qwen3 again: no custom code
        assert config["model_type"] == "qwen3" and "auto_map" not in config and "qk_norm" not in config
    else:
        assert config["model_type"].startswith("rehead_") and config["qk_norm"] is True
    if setting == "gda-grow":  # the noise heads are normalised like the heads they come from
        assert {"model.layers.0.self_attn.noise.q_norm.weight", "model.layers.0.self_attn.noise.k_norm.weight"} <= names
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


def test_a_layout_without_the_norms_would_differ(tmp_path):
    """The identity test above can fail: the same weights without the q/k norms compute other logits."""
    src = make_qwen3(tmp_path / "src")
    out = convert(src, tmp_path / "moh", to="moh", active_heads=4, shared_heads=1)
    config = read_json(out / "config.json")
    (out / "config.json").write_text(json.dumps({**config, "qk_norm": False}))
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() > 1e-2


@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
def test_identical_key_heads_fuse_exactly_through_the_norms(tmp_path, calib_file, kv):
    """The closed form of normalised keys (dha_fusion's docstring): fusing identical heads is exact,
    with every query pair scale 1 + 0i; the same fusion of heads that differ is not."""
    calib = dict(calib=str(calib_file), calib_tokens=512, calib_seq_len=128, refine_steps=0)
    src = make_qwen3(tmp_path / "src", kv=4, duplicate_kv=True)
    out = convert(src, tmp_path / "dha", to="dha", k_budget=0.5, v_budget=0.5, **calib)
    config = read_json(out / "config.json")
    assert config["key_heads_per_layer"] == [2, 2] and config["dha_query_scale"] is True
    scale = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_pair_scale"]
    torch.testing.assert_close(scale, torch.cat([torch.ones(4, 8), torch.zeros(4, 8)], 1), atol=1e-5, rtol=0)
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-4
    # the layout's files carried in the checkpoint hold the norms and pair scales without rehead installed
    report = load_without_rehead(out, IDS[:1, :8].tolist(), tmp_path)
    assert report["class"] == "DHAForCausalLM" and report["static_equal"]
    torch.testing.assert_close(torch.tensor(report["logits"]), logits(src, IDS[:1, :8])[0, -1], atol=1e-4, rtol=0)
    other = convert(make_qwen3(tmp_path / "src2", kv=4), tmp_path / "dha2", to="dha", k_budget=0.5, v_budget=0.5,
                    **calib)
    assert (logits(other, IDS) - logits(tmp_path / "src2", IDS)).abs().max() > 1e-3


def test_calibrated_conversions_run_and_stay_close(tmp_path, calib_file):
    """Each calibrated conversion of a Qwen3 source (MoH's calibrated shared heads and learned router, DHA's
    planned fusion with refinement, GDA's repurposed heads) writes a model that loads and scores; DHA's
    q/k norms survive its refinement."""
    src = make_qwen3(tmp_path / "src", kv=2)
    calib = dict(calib=str(calib_file), calib_tokens=512, calib_seq_len=128)
    outs = {
        "moh": convert(src, tmp_path / "moh", to="moh", active_heads=3, shared_heads=1, **calib),
        "moh-learned": convert(src, tmp_path / "moh-l", to="moh", router="learned", active_heads=3, shared_heads=1,
                               **calib),
        "dha": convert(src, tmp_path / "dha", to="dha", kv_budget=0.5, refine_steps=3, **calib),
        "gda": convert(src, tmp_path / "gda", to="gda", ratio=1, mode="repurpose", **calib),
    }
    source = logits(src, IDS)
    # the mean L1 distance of the next-token distributions, measured 0.024, 0.023, 0.013 and 0.032 (CPU-2,
    # 2026-12-02); another random model of the same config is 0.13 away
    bounds = {"moh": 0.05, "moh-learned": 0.05, "dha": 0.03, "gda": 0.065}
    distance = lambda got: (got.softmax(-1) - source.softmax(-1)).abs().sum(-1).mean().item()  # noqa: E731
    for name, out in outs.items():
        assert distance(logits(out, IDS)) < bounds[name], name
    assert distance(logits(make_qwen3(tmp_path / "other", kv=2, seed=5), IDS)) > 0.1
    refined = read_json(tmp_path / "dha" / "dha_plan.json")["refinement"]
    assert refined and all(r["error_after"] <= r["error_before"] for r in refined)


def test_the_router_reads_the_query_before_its_norm(tmp_path):
    """After q_norm a head's query norm is √d·(a weighted RMS of g): with the norm's initial weights (g = 1)
    every head scores exactly √d, so the query-norm router reads the query as q_proj gives it; its gates
    are those of the pre-norm norms (test_head_dim's reference, which scores q before the norm)."""
    src = make_qwen3(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    attn, hidden = model.model.layers[0].self_attn, torch.randn(1, 24, 32)
    with torch.no_grad():
        attn.q_norm.weight.fill_(1.0)
        raw = attn.q_proj(hidden).view(1, 24, 4, 16)
        normed = attn.q_norm(raw).norm(dim=-1)
    torch.testing.assert_close(normed, torch.full_like(normed, 4.0), atol=0, rtol=1e-3)  # up to the eps
    assert raw.norm(dim=-1).std(-1).min() > 1e-3


@pytest.mark.parametrize("options, message", [
    (dict(to="mla", kv_budget=0.5), "per-head q/k norms .* --to mla cannot hold this model"),
    (dict(to="dha", kv_budget=0.5, export="deci"), "per-head q/k norms .* --export deci would drop them"),
    (dict(to="dha", kv_budget=0.5, uniform=True), "--uniform --fusion optimal on a source with per-head q/k norms"),
])
def test_what_cannot_hold_the_norms_is_refused_before_any_work(tmp_path, calib_file, options, message):
    src = make_qwen3(tmp_path / "src", kv=4)
    with pytest.raises(ReheadError, match=message):
        convert(src, tmp_path / "out", calib=str(calib_file), calib_tokens=512, calib_seq_len=128, **options)
    assert not (tmp_path / "out").exists()


def test_a_sliding_window_is_refused(tmp_path, capsys):
    src = make_qwen3(tmp_path / "src", use_sliding_window=True, sliding_window=16, max_window_layers=1)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "mha"]) == 2
    assert "Qwen3 with a sliding window" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_qwen3_conversion_tunes(tmp_path, calib_file):
    src = make_qwen3(tmp_path / "src", kv=2)
    dha = convert(src, tmp_path / "dha", to="dha", kv_budget=0.5, refine_steps=0, calib=str(calib_file),
                  calib_tokens=512, calib_seq_len=128)
    run = load(None, [], {"model": str(dha), "teacher": str(src), "loss.kd": 1.0, "data.train": str(calib_file),
                          "data.eval": None, "data.seq_len": 64, "train.max_steps": 2, "train.micro_batch": 2,
                          "optim.lr": 1e-3, "optim.warmup_steps": 1, "trainable": "new",
                          "output_dir": str(tmp_path / "run")})
    out = tune(run).model
    before, after = load_file(dha / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.layers.0.self_attn.q_pair_scale" in changed and "model.layers.0.self_attn.k_proj.weight" in changed
    assert not any("q_norm" in name or "mlp" in name for name in changed)  # trainable: new


def test_inspect_reads_a_qwen3_source(tmp_path):
    info = describe(make_qwen3(tmp_path / "src", kv=2))
    assert info["family"] == "Qwen3" and info["architecture"] == "Qwen3ForCausalLM"
    assert (info["query_heads"], info["key_heads_per_layer"], info["head_dim"]) == (4, [2, 2], 16)
    per_head = 2 * 16 * 2  # one K or V head over 2 layers in bf16
    would = {flags: row["kv_cache_bytes_per_token_bf16"] for flags, row in info["if_converted"].items()}
    assert would["--to mha"] == 8 * per_head and would["--to dha --kv-budget 0.5"] == 2 * per_head


def test_a_qwen3_conversion_is_scored_against_its_source(tmp_path, calib_file):
    pytest.importorskip("lm_eval")
    from rehead.eval import evaluate

    src = make_qwen3(tmp_path / "src", kv=2)
    dha = convert(src, tmp_path / "dha", to="dha", kv_budget=0.5, refine_steps=0, calib=str(calib_file),
                  calib_tokens=512, calib_seq_len=128)
    outcome = evaluate(str(dha), str(src), tasks="rehead_cloze,rehead_pydoc_ppl", limit=4, out=tmp_path / "ev",
                       use_cache=False)
    assert {r["task"] for r in outcome.rows} == {"rehead_cloze", "rehead_pydoc_ppl"}
    ppl = next(r for r in outcome.rows if r["metric"] == "word_perplexity")
    assert ppl["delta"] != 0  # the conversion, not its source, was scored
    assert ppl["retention"] == pytest.approx(100 * ppl["baseline"] / ppl["candidate"])


def test_a_qwen3_checkpoint_without_its_norms_is_refused_by_name(tmp_path, capsys):
    """A Qwen3 config whose weights lack the k_norm of a layer (a LLaMA checkpoint relabelled, say) is refused
    from the shard headers before any work, naming the tensor."""
    from safetensors.torch import save_file

    src = make_qwen3(tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "moh"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.k_norm.weight" in err and "lack" in err and not (tmp_path / "out").exists()


def test_the_default_router_is_the_one_measured_best_for_the_source(tmp_path, tiny, calib_file):
    """--router's default: learned for a source without q/k norms, query-norm (reading the query before
    q_norm) for one with them (BENCHMARKS.md "MoH's default router"); rehead.json records which."""
    calib = dict(calib=str(calib_file), calib_tokens=512, calib_seq_len=128, active_heads=3, shared_heads=1)
    for source, router in ((make_qwen3(tmp_path / "qwen3", kv=2), "query-norm"), (tiny("gqa"), "learned")):
        out = convert(source, tmp_path / router, to="moh", **calib)
        assert read_json(out / "config.json")["moh_router"] == router
        assert read_json(out / "rehead.json")["options"]["router"] == router
        assert any("router_routed" in name for name in load_file(out / "model.safetensors")) == (router == "learned")
