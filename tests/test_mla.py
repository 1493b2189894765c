"""MLA: the stock DeepSeek-V3 export against a plain reference, the identity, the fit's pieces, what
it refuses, and transformers' caches on it."""

import math

import pytest
import torch
from conftest import load_without_rehead, logits, read_json
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV3Config, DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

from rehead import metrics, text
from rehead.card import card
from rehead.convert import convert, mla_fusion
from rehead.describe import describe, format_text
from rehead.errors import ReheadError

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
CALIB = dict(calib_tokens=2048, calib_seq_len=128)


def to_mla(source, tmp_path, calib_file, name="mla", **options):
    return convert(str(source), tmp_path / name, to="mla", calib=str(calib_file), **CALIB, **options)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_logits(folder, ids) -> torch.Tensor:
    """DeepSeek MLA written out in float64 from the export's tensors: per head, the position-free
    logit q_nope·k_nope plus the RoPE logit Re(q·conj(k)) of each interleaved pair (x_2k, x_2k+1)
    rotated by e^{iθ_k·pos}, θ_k = theta^(−2k/R), over √(nope + rope); the latent RMS-normed with eps 1e-6."""
    config = read_json(folder / "config.json")
    w = {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}
    heads, rank, rope, nope, dv = (config[k] for k in ("num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
                                                         "qk_nope_head_dim", "v_head_dim"))
    eps, seq = config["rms_norm_eps"], len(ids)
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * config["rope_parameters"]["rope_theta"] ** (
        -torch.arange(0, rope, 2, dtype=torch.float64) / rope)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (L, R/2)
    h = w["model.embed_tokens.weight"][ids]
    for layer in range(config["num_hidden_layers"]):
        p = {k.removeprefix(f"model.layers.{layer}."): v for k, v in w.items() if k.startswith(f"model.layers.{layer}.")}
        x = rms(h, p["input_layernorm.weight"], eps)
        q = (x @ p["self_attn.q_proj.weight"].T).view(seq, heads, nope + rope)
        latent = x @ p["self_attn.kv_a_proj_with_mqa.weight"].T
        c = rms(latent[:, :rank], p["self_attn.kv_a_layernorm.weight"], 1e-6)
        k_rope = torch.complex(latent[:, rank::2], latent[:, rank + 1 :: 2]) * rotation  # (L, R/2)
        kv = (c @ p["self_attn.kv_b_proj.weight"].T).view(seq, heads, nope + dv)
        out = torch.zeros(seq, heads, dv, dtype=torch.float64)
        for i in range(heads):
            q_rope = torch.complex(q[:, i, nope::2], q[:, i, nope + 1 :: 2]) * rotation
            scores = q[:, i, :nope] @ kv[:, i, :nope].T + (q_rope @ k_rope.conj().T).real
            scores = scores / math.sqrt(nope + rope) + torch.full((seq, seq), float("-inf")).triu(1)
            out[:, i] = scores.softmax(-1) @ kv[:, i, nope:]
        h = h + out.flatten(1) @ p["self_attn.o_proj.weight"].T
        x = rms(h, p["post_attention_layernorm.weight"], eps)
        gate, up = x @ p["mlp.gate_proj.weight"].T, x @ p["mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ p["mlp.down_proj.weight"].T
    return rms(h, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


# ---- the format and the reference ----


@pytest.mark.parametrize("variant, options", [("mha", dict(kv_budget=0.5)), ("gqa", dict(kv_rank=12, rope_dim=4)),
                                              ("mqa-tied", dict(kv_budget=0.75))])
def test_export_is_a_stock_deepseek_v3_that_matches_the_reference(tiny, tmp_path, calib_file, variant, options):
    source = tiny(variant, rms_norm_eps=1e-5)
    out = to_mla(source, tmp_path, calib_file, **options)
    config = read_json(out / "config.json")
    layers = config["num_hidden_layers"]
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "auto_map" not in config and not list(out.glob("*.py"))
    assert config["first_k_dense_replace"] == layers and isinstance(config["n_routed_experts"], int)
    assert config["q_lora_rank"] is None and config["rope_interleave"] is True
    assert config["rms_norm_eps"] == 1e-6 and config["routed_scaling_factor"] == 1.0
    assert config["tie_word_embeddings"] is False and "lm_head.weight" in load_file(out / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    for b in range(len(IDS)):
        torch.testing.assert_close(logits(out, IDS[b : b + 1])[0].double(), reference_logits(out, IDS[b]),
                                   atol=1e-4, rtol=1e-4)


def test_the_budget_counts_the_latent_and_the_rope_key(tiny, tmp_path, calib_file):
    out = to_mla(tiny("gqa"), tmp_path, calib_file, kv_budget=0.5)  # 2 KV heads of 8 dims: 32 values cached
    config = read_json(out / "config.json")
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (12, 4)
    assert read_json(out / "rehead.json")["plan"]["kept"]["kv"] == 0.5


def test_identity_an_mqa_source_at_full_rank_is_the_source(tiny, tmp_path, calib_file):
    """One KV head, every RoPE pair rotated, the latent as wide as the value: the source's function up
    to the linearised norm (and an eps of 1e-5 in the source: the residual stream is rescaled, exactly)."""
    source = tiny("mqa-tied", rms_norm_eps=1e-5)
    out = to_mla(source, tmp_path, calib_file, kv_rank=8, rope_dim=8)
    expected, got = logits(source, IDS), logits(out, IDS)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    plan = read_json(out / "rehead.json")["plan"]
    assert plan["residual_scale"] == pytest.approx(math.sqrt(0.1)) and max(plan["latent_error_per_layer"]) < 1e-9


def test_the_fit_improves_with_the_budget(tiny, tmp_path, calib_file):
    source = tiny("gqa")
    expected = logits(source, IDS).log_softmax(-1)
    divergences = []
    for budget in (1.0, 0.5, 0.25):
        got = logits(to_mla(source, tmp_path, calib_file, f"mla-{budget}", kv_budget=budget), IDS).log_softmax(-1)
        divergences.append((expected.exp() * (expected - got)).sum(-1).mean().item())
    assert divergences[0] < divergences[1] < divergences[2] < 0.1


def test_where_dhas_solution_fits_the_fit_can_start_from_it(tiny, tmp_path, calib_file, monkeypatch):
    """At rope dim = head_dim and a latent of one value head, DHA's solution with one key group and one
    value group is an MLA latent (dha_basis): kept in every layer, the DeepSeek export computes what
    DHA's own conversion with that plan computes (to the linearised norm)."""
    source = tiny("odd")  # 3 KV heads of 8 dims: 1/3 of them is one key head and one value head per layer
    dha = convert(str(source), tmp_path / "dha", to="dha", k_budget=1 / 3, v_budget=1 / 3, refine_steps=0,
                  calib=str(calib_file), **CALIB)
    monkeypatch.setattr(mla_fusion, "latent_basis", mla_fusion.dha_basis)  # the fit takes DHA's basis
    out = to_mla(source, tmp_path, calib_file, kv_rank=8, rope_dim=8, refine_steps=0)
    assert read_json(dha / "rehead.json")["plan"]["kept"]["kv"] == read_json(out / "rehead.json")["plan"]["kept"]["kv"]
    expected, got = logits(dha, IDS), logits(out, IDS)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got - logits(source, IDS)).abs().max() > 1e-2 * expected.abs().max()  # a real fusion, not the source


def test_the_fit_is_never_worse_than_dhas_solution_on_its_objective(tiny, tmp_path, calib_file):
    source = tiny("odd", layers=3)
    for rank in (8, 12, 16):  # one fused value head; one and a half; two
        plan = read_json(to_mla(source, tmp_path, calib_file, f"mla-{rank}", kv_rank=rank, rope_dim=8) / "rehead.json")["plan"]
        assert len(plan["dha_error_per_layer"]) == 3
        for latent, dha in zip(plan["latent_error_per_layer"], plan["dha_error_per_layer"]):
            assert latent < dha  # strictly here: DHA drops the key residuals, which the latent fit also holds
    # a rope dim below head_dim: DHA's fused key does not fit the format
    plan = read_json(to_mla(source, tmp_path, calib_file, "mla-4", kv_rank=8, rope_dim=4) / "rehead.json")["plan"]
    assert "dha_error_per_layer" not in plan


def test_refinement_lowers_the_layer_error_and_leaves_the_latent_as_fitted(tiny, tmp_path, calib_file):
    source = tiny("gqa")
    closed = load_file(to_mla(source, tmp_path, calib_file, "closed", kv_budget=0.5, refine_steps=0) / "model.safetensors")
    out = to_mla(source, tmp_path, calib_file, "refined", kv_budget=0.5, refine_steps=30, refine_lr=1e-3)
    refined = load_file(out / "model.safetensors")
    records = read_json(out / "rehead.json")["plan"]["refinement"]
    assert [r["layer"] for r in records] == [0, 1]
    assert all(r["error_after"] < r["error_before"] for r in records)
    for name in (n for n in refined if n.startswith("model.layers.0.")):  # later layers see refined inputs
        changed = not torch.equal(refined[name], closed[name])
        assert changed == name.endswith(("q_proj.weight", "kv_b_proj.weight", "o_proj.weight")), name
    # a refinement that raises the error is dropped: the closed form's tensors are written
    out = to_mla(source, tmp_path, calib_file, "diverged", kv_budget=0.5, refine_steps=5, refine_lr=10.0)
    assert not any(r["error_after"] < r["error_before"] for r in read_json(out / "rehead.json")["plan"]["refinement"])
    diverged = load_file(out / "model.safetensors")
    assert all(torch.equal(diverged[name], closed[name]) for name in closed)


# ---- the fit's pieces ----


@pytest.mark.parametrize("rope_dim", [2, 4, 8])
def test_deepseek_frequencies_are_the_sources_first_pairs(rope_dim):
    """transformers' DeepSeek rotary embedding, at the export's rope_theta, rotates by the source's
    first R/2 frequencies."""
    head_dim, base = 8, 10000.0
    config = DeepseekV3Config(qk_rope_head_dim=rope_dim, rope_parameters={
        "rope_type": "default", "rope_theta": mla_fusion.rope_base(base, head_dim, rope_dim)})
    ours = DeepseekV3RotaryEmbedding(config).inv_freq.double()
    torch.testing.assert_close(ours, mla_fusion.inverse_frequencies(base, head_dim)[: rope_dim // 2], rtol=1e-6, atol=0)


def test_rotation_means_are_the_attention_weighted_phases():
    inv_freq = torch.tensor([1.0, 0.1], dtype=torch.float64)
    seq = 6
    to_previous = torch.diag(torch.ones(seq - 1), -1)
    to_previous[0, 0] = 1.0  # the first token has only itself
    beta = mla_fusion.rotation_means(torch.stack([torch.eye(seq), to_previous])[None], inv_freq)  # heads: self, previous
    torch.testing.assert_close(beta[0], torch.ones(2, dtype=torch.complex128))
    expected = (torch.polar(torch.ones(2, dtype=torch.float64), inv_freq) * (seq - 1) + 1) / seq
    torch.testing.assert_close(beta[1], expected)


# ---- what the format cannot hold ----


@pytest.mark.parametrize("variant, overrides, options, message", [
    ("bias", {}, {}, "attention_bias"),
    ("qwen2", {}, {}, "attention_bias"),
    ("gqa", dict(mlp_bias=True), {}, "mlp_bias"),
    ("gqa", dict(hidden_act="gelu"), {}, "SiLU only"),
    ("gqa", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), {}, "DeepSeek-YaRN"),
    ("gqa", {}, dict(rope_dim=16), "at most head_dim"),
    ("gqa", {}, dict(kv_budget=0.1), "leave no latent"),
    ("gqa", {}, dict(kv_rank=40), "above the 32"),
])
def test_what_the_format_cannot_hold_is_refused_before_any_work(tiny, tmp_path, calib_file, variant, overrides,
                                                                 options, message):
    source = tiny(variant, **overrides)
    with pytest.raises(ReheadError, match=message):
        to_mla(source, tmp_path, calib_file, **(options if "kv_rank" in options else {"kv_budget": 0.5} | options))
    assert not (tmp_path / "mla").exists()


@pytest.mark.parametrize("options, message", [
    ({}, "needs one size"),
    (dict(kv_budget=0.5, kv_rank=4), "needs one size"),
    (dict(kv_budget=1.5), r"must be in \(0, 1\]"),
    (dict(kv_rank=4, rope_dim=3), "must be even"),
    (dict(kv_budget=0.5, dtype="fp16"), "bf16 or fp32"),
])
def test_options_are_checked(tiny, tmp_path, options, message):
    with pytest.raises(ReheadError, match=message):
        convert(str(tiny()), tmp_path / "mla", to="mla", **options)


# ---- serving in transformers ----


def test_cache_holds_the_latent_and_both_caches_generate_alike(tiny, tmp_path, calib_file):
    out = to_mla(tiny("gqa"), tmp_path, calib_file, kv_budget=0.5)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS, cache=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == model.config.num_hidden_layers * IDS.numel() * (12 + 4) * 4  # (latent + rope) fp32 values
    loaded = load_without_rehead(out, IDS.tolist(), tmp_path)
    assert loaded["class"] == "DeepseekV3ForCausalLM" and loaded["new_tokens"] == 6 and loaded["static_equal"]
    info = describe(out)  # rehead inspect: what the cache holds, in bf16
    assert info["layout"] == "mla" and info["kv_cache_bytes_per_token_bf16"] == model.config.num_hidden_layers * 16 * 2
    assert "one latent" in format_text(info) and info["key_heads_per_layer"] is None
    assert info["head_dim"] == model.config.qk_nope_head_dim + 4  # a query·key head: position-free + RoPE dims
    source_bytes = read_json(out / "rehead.json")["source"]["kv_cache_bytes_per_token_bf16"]
    assert f"{info['kv_cache_bytes_per_token_bf16']:,} bytes per token in bf16" in str(card(out))
    assert info["kv_cache_bytes_per_token_bf16"] == source_bytes // 2  # --kv-budget 0.5


def test_tuning_the_export_trains_the_attention_and_keeps_a_stock_checkpoint(tiny, tmp_path, calib_file):
    import re

    from test_tune import metrics, recipe, weights

    from rehead.tune import tune

    mla = to_mla(tiny("gqa", rms_norm_eps=1e-5), tmp_path, calib_file, kv_budget=0.5)
    out = tune(recipe(tmp_path, mla, calib_file, trainable="attention",
                      **{"optim.weight_decay": 0.0, "train.eval_every": 4})).model
    # kv_a_layernorm runs linear only at the converted scale: those tensors stay (on smollm2-135m, 8 Adam steps at
    # lr 1e-4 on the latent's tiny rows took the held-out perplexity from about 60 to 2.7·10¹⁰)
    evals = [row["eval_ppl"] for row in metrics(tmp_path / "run", "eval")]
    assert len(evals) == 2 and evals[-1] < 1.5 * evals[0]
    linear = [k for k in weights(mla) if "kv_a_proj_with_mqa" in k or "kv_a_layernorm" in k]
    assert linear and all(torch.equal(weights(mla)[k], weights(out)[k]) for k in linear)
    config = read_json(out / "config.json")
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and "auto_map" not in config
    assert config["kv_lora_rank"] == read_json(mla / "config.json")["kv_lora_rank"]
    before, after = weights(mla), weights(out)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(re.search(r"\.self_attn\.", k) for k in changed)
    assert load_without_rehead(out, [[5, 17, 99]], tmp_path)["class"] == "DeepseekV3ForCausalLM"


@pytest.mark.real
def test_real_model_exports_as_stock_deepseek(smollm2, tmp_path):
    """smollm2-135m at half its KV cache: plain from_pretrained, the reference's logits, the latent cache,
    greedy decoding alike with the dynamic and the static cache, and held-out perplexity near the source's
    (×1.45 on these 2,048 tokens, calibrated on 2,048)."""
    out = convert("smollm2-135m", tmp_path / "mla", to="mla", kv_budget=0.5, calib_tokens=2048, refine_steps=0)
    config = read_json(out / "config.json")
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (160, 32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = text.blocks(tokenizer, "shakespeare-heldout", 64, 64)
    torch.testing.assert_close(logits(out, ids)[0].double(), reference_logits(out, ids[0]), atol=2e-4, rtol=2e-4)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 30 * 64 * (160 + 32) * 4  # half of the source's 30 · 64 · 384 · 4
    dynamic = model.generate(ids, max_new_tokens=12, do_sample=False)
    static = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    source = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    blocks = text.blocks(tokenizer, "shakespeare-heldout", 2048, 512)
    assert metrics.perplexity(model, blocks, 4) < 1.6 * metrics.perplexity(source, blocks, 4)  # measured ×1.45


def test_a_checkpoint_that_trained_other_parameters_is_refused_on_resume(tiny, tmp_path, calib_file, monkeypatch):
    """A run resumed by a rehead that selects other parameters (here: before the export's linear latent was
    kept as converted) is refused with the reason, not torch's optimizer error."""
    from test_tune import recipe

    from rehead.tune import loop, tune

    mla = to_mla(tiny("gqa", rms_norm_eps=1e-5), tmp_path, calib_file, kv_budget=0.5)
    values = {"trainable": "attention", "train.save_every": 1, "data.eval": None}
    with monkeypatch.context() as patch:
        patch.setattr(loop, "LINEARISED_LATENT", ())
        tune(recipe(tmp_path, mla, calib_file, **values, **{"train.max_steps": 1}))
    with pytest.raises(ReheadError, match="its optimizer state holds other parameters than this run trains"):
        tune(recipe(tmp_path, mla, calib_file, **values, **{"train.max_steps": 2}))
