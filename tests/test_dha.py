"""DHA: the modeling code against a plain reference, the fusion math, the planner, the outputs."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import BLOCK_REHEAD, assert_matches_reference, logits, randomise, read_json
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file

import rehead  # noqa: F401
from rehead.convert import convert
from rehead.convert.dha_fusion import LayerFusion, agglomerate, augmented
from rehead.convert.dha_planning import allocate
from rehead.describe import describe
from rehead.errors import ReheadError
from rehead.layouts.configuration_dha import DHAConfig
from rehead.layouts.modeling_dha import DHAForCausalLM

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def dha_model(key_map, value_map, heads=6, attn="sdpa", seed=0):
    keys, values = max(key_map) + 1, max(value_map) + 1
    config = DHAConfig(
        vocab_size=50, hidden_size=heads * 4, intermediate_size=32, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=heads, attention_bias=True, max_position_embeddings=64,
        key_heads_per_layer=[keys, 1], value_heads_per_layer=[values, 1],
        key_head_of_query=[key_map, [0] * heads], value_head_of_query=[value_map, [0] * heads],
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = DHAForCausalLM(config).eval()
    return randomise(model)


def reference_logits(model, ids):
    """Each query head i attends with key head κ(i) and value head ν(i), written out in float64."""
    from test_moh_layout import head_norm, rope

    inner = model.model
    h = inner.embed_tokens.weight.double()[ids]
    cos, sin = (t[0].double() for t in inner.rotary_emb(h[None].float(), torch.arange(len(ids))[None]))
    for layer in inner.layers:
        attn = layer.self_attn
        p = {n: t.double() for n, t in attn.named_parameters()}
        x = layer.input_layernorm.double()(h)
        d, seq = attn.head_dim, len(ids)
        q = (x @ p["q_proj.weight"].T + p["q_proj.bias"]).view(seq, -1, d)
        k = (x @ p["k_proj.weight"].T + p["k_proj.bias"]).view(seq, -1, d)
        v = (x @ p["v_proj.weight"].T + p["v_proj.bias"]).view(seq, -1, d)
        q, k = head_norm(p, "q_norm", q, model.config.rms_norm_eps), head_norm(p, "k_norm", k, model.config.rms_norm_eps)
        if "q_pair_scale" in p:  # each pair (t, t + d/2) of head i times the complex scale a + ib
            a, b = p["q_pair_scale"].chunk(2, -1)
            pairs = torch.complex(*q.chunk(2, -1)) * torch.complex(a, b)
            q = torch.cat([pairs.real, pairs.imag], -1)
        out = torch.zeros_like(h)
        for t in range(seq):
            for i in range(q.shape[1]):
                keys = torch.stack([rope(k[s, attn.key_of_query[i]], cos[s], sin[s]) for s in range(t + 1)])
                weights = torch.softmax(keys @ rope(q[t, i], cos[t], sin[t]) / math.sqrt(d), 0)
                out[t] += p["o_proj.weight"][:, i * d : (i + 1) * d] @ (weights @ v[: t + 1, attn.value_of_query[i]])
        h = h + out + p["o_proj.bias"]
        h = h + layer.mlp.double()(layer.post_attention_layernorm.double()(h))
    result = model.lm_head.double()(inner.norm.double()(h))
    model.float()
    return result


MAPS = {
    "decoupled": ([0, 1, 0, 2, 1, 2], [0, 0, 1, 1, 1, 0]),  # K and V grouped differently, not contiguous
    "grouped": ([0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]),  # plain GQA: the kernels repeat the heads
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("maps", list(MAPS))
def test_fast_path_matches_reference(attn, maps):
    model = dha_model(*MAPS[maps], attn=attn)
    assert model.model.layers[0].self_attn.grouped == (maps == "grouped")
    ids = torch.randint(0, 50, (2, 7))
    assert_matches_reference(model, reference_logits, ids)


def test_cache_holds_only_the_fused_heads_and_generate_matches_the_full_forward():
    model = dha_model(*MAPS["decoupled"])
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        full = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, prompt.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.shape[1] == 3 and values.shape[1] == 2  # 3 key heads and 2 value heads in layer 0
    assert cache.layers[1].keys.shape[1] == 1


def test_config_refuses_maps_that_skip_a_head():
    with pytest.raises(StrictDataclassClassValidationError, match="using every one"):
        DHAConfig(hidden_size=24, num_attention_heads=6, num_hidden_layers=1, key_heads_per_layer=[3],
                  key_head_of_query=[[0, 0, 1, 1, 1, 1]])


# ---- the fusion math ----


def random_layer(kv=3, heads=6, d=8, width=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = augmented(torch.randn(heads * d, width, generator=gen), torch.randn(heads * d, generator=gen), heads)
    k = augmented(torch.randn(kv * d, width, generator=gen), torch.randn(kv * d, generator=gen), kv)
    v = augmented(torch.randn(kv * d, width, generator=gen), torch.randn(kv * d, generator=gen), kv)
    o = torch.randn(width, heads * d, generator=gen)
    x = torch.cat([torch.randn(4000, width, generator=gen), torch.ones(4000, 1)], 1).double()
    return q, k, v, o, x


def complex_rows(w, half):
    return torch.complex(w[..., :half, :], w[..., half:, :])


def test_keys_that_differ_by_complex_scales_fuse_exactly():
    """k_1 = c ⊙ k_0 per RoPE pair: one fused key head and folded query scales reproduce every logit."""
    q, k, v, o, x = random_layer()
    half = 4
    scale = torch.complex(torch.randn(half, dtype=torch.float64), torch.randn(half, dtype=torch.float64))
    rows = complex_rows(k[0], half) * scale[:, None]
    k[1] = torch.cat([rows.real, rows.imag])
    reads = [0, 0, 1, 1, 2, 2]
    fusion = LayerFusion(q, k, v, o, x.T @ x / len(x), reads)
    assert fusion.key_error((0, 1)) < 1e-9 * fusion.key_energy((0, 1))
    assert fusion.key_error((0, 2)) > 1e-3 * fusion.key_energy((0, 2))
    fused, scales = fusion.fuse_keys((0, 1))
    for i in range(4):  # query heads 0-3 read key heads 0 and 1
        original = (x @ q[i].T) @ (x @ k[reads[i]].T).T  # logits before RoPE (pairs rotate together)
        qi = complex_rows(fusion.fold_query(i, scales[reads[i]]), half) @ x.T.to(torch.complex128)
        kf = complex_rows(fused, half) @ x.T.to(torch.complex128)
        folded = (qi.T @ kf.conj()).real
        torch.testing.assert_close(folded, original, atol=1e-6 * original.abs().max(), rtol=0)


def test_values_that_are_linear_maps_of_each_other_fuse_exactly():
    q, k, v, o, x = random_layer()
    transform = torch.randn(8, 8, dtype=torch.float64)
    v[2] = transform @ v[0]
    fusion = LayerFusion(q, k, v, o, x.T @ x / len(x), [0, 0, 1, 1, 2, 2])
    assert fusion.value_error((0, 2)) < 1e-9 * fusion.value_energy((0, 2))
    fused, maps = fusion.fuse_values((0, 2))
    for j in (0, 2):
        torch.testing.assert_close(x @ fused.T @ maps[j], x @ v[j].T, atol=1e-7, rtol=1e-7)


def test_mean_fusion_averages_the_members():
    q, k, v, o, x = random_layer()
    fusion = LayerFusion(q, k, v, o, x.T @ x / len(x), [0, 0, 1, 1, 2, 2])
    fused, maps = fusion.fuse_values((0, 1), mean=True)
    torch.testing.assert_close(fused, (v[0] + v[1]) / 2)
    assert all(torch.equal(m, torch.eye(8, dtype=torch.float64)) for m in maps.values())


def test_agglomerate_merges_the_cheapest_pairs_first():
    cost = {(0, 1): 5.0, (0, 2): 1.0, (1, 2): 3.0, (0, 1, 2): 6.0}
    history = agglomerate(3, lambda g: cost.get(g, 0.0), 1)
    assert history[2] == [(0, 2), (1,)] and history[1] == [(0, 1, 2)]


def test_allocation_spends_merges_where_they_cost_least():
    curves = {(0, "k"): {3: 0, 2: 1.0, 1: 10.0}, (0, "v"): {3: 0, 2: 0.1, 1: 0.2},
              (1, "k"): {3: 0, 2: 5.0, 1: 50.0}, (1, "v"): {3: 0, 2: 0.5, 1: 20.0}}
    counts = allocate(curves, target=8, start=3)
    assert counts == {(0, "k"): 2, (0, "v"): 1, (1, "k"): 3, (1, "v"): 2}


# ---- conversions ----


@pytest.mark.parametrize("variant", ["mha", "gqa", "odd", "qwen2", "mqa-tied"])
def test_budget_one_is_the_source(tiny, tmp_path, variant):
    src = tiny(variant)
    out = convert(src, tmp_path / "dha", to="dha", kv_budget=1.0)
    assert read_json(out / "config.json")["model_type"] == "rehead_dha"
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


def shuffled_repeats(src, folder, order):
    """An MHA checkpoint whose K/V heads repeat the source's GQA heads, query heads in ``order``: the same function."""
    mha = convert(src, folder / "mha-sorted", to="mha")
    config = read_json(mha / "config.json")
    d = config["hidden_size"] // config["num_attention_heads"]
    tensors = load_file(mha / "model.safetensors")
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in order])
    for name in list(tensors):
        if any(f"self_attn.{p}_proj.weight" in name or f"self_attn.{p}_proj.bias" in name for p in "qkv"):
            tensors[name] = tensors[name][rows]
        elif "o_proj.weight" in name:
            tensors[name] = tensors[name][:, rows]
    save_file(tensors, mha / "model.safetensors", metadata={"format": "pt"})
    return mha


def test_repeated_heads_are_found_and_fused_exactly(tiny, tmp_path, calib_file):
    src = tiny("gqa")  # 6 query heads, 2 KV heads: after repeating, K/V heads 0-2 and 3-5 are copies
    mha = shuffled_repeats(src, tmp_path, [0, 3, 1, 4, 2, 5])
    reference = logits(src, IDS)
    assert (logits(mha, IDS) - reference).abs().max() <= 1e-5
    out = convert(mha, tmp_path / "dha", to="dha", kv_budget=1 / 3, calib=str(calib_file), calib_tokens=1024,
                  calib_seq_len=128)
    plan = read_json(out / "dha_plan.json")
    assert plan["layers"][0]["key_groups"] == [[0, 2, 4], [1, 3, 5]] == plan["layers"][0]["value_groups"]
    assert (logits(out, IDS) - reference).abs().max() <= 1e-4


def test_uniform_writes_a_stock_checkpoint_that_transformers_loads_alone(tiny, tmp_path, calib_file):
    src = tiny("gqa")
    mha = shuffled_repeats(src, tmp_path, [0, 3, 1, 4, 2, 5])
    out = convert(mha, tmp_path / "uniform", to="dha", kv_budget=1 / 3, uniform=True, calib=str(calib_file),
                  calib_tokens=1024, calib_seq_len=128)
    config = read_json(out / "config.json")
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 and "auto_map" not in config
    assert not list(out.glob("*.py"))
    ids = IDS[:1, :9]
    code = BLOCK_REHEAD + (
        "import json, sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
        "print(json.dumps(m(torch.tensor(json.loads(sys.argv[2]))).logits[0, -1].tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(out), json.dumps(ids.tolist())],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    alone = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(alone, logits(src, ids)[0, -1], atol=1e-4, rtol=1e-4)


def test_optimal_fusion_beats_mean_pooling_and_refinement_helps(tiny, tmp_path, calib_file):
    src = tiny("odd")
    reference = logits(src, IDS)
    error = {}
    for name, options in {"mean": dict(fusion="mean", refine_steps=0), "optimal": dict(refine_steps=0),
                          "refined": dict(refine_steps=40)}.items():
        out = convert(src, tmp_path / name, to="dha", kv_budget=1 / 3, calib=str(calib_file), calib_tokens=1024,
                      calib_seq_len=128, **options)
        error[name] = (logits(out, IDS) - reference).pow(2).mean().item()
    assert error["refined"] < error["optimal"] < error["mean"]
    refinement = read_json(out / "dha_plan.json")["refinement"]
    assert all(r["error_after"] < r["error_before"] for r in refinement)


def test_plan_files_and_inspect(tiny, tmp_path, calib_file):
    src = tiny("mha")  # 4 KV heads, 2 layers
    out = convert(src, tmp_path / "dha", to="dha", kv_budget=0.5, calib=str(calib_file), calib_tokens=1024,
                  calib_seq_len=128)
    plan = read_json(out / "dha_plan.json")
    keys, values = plan["key_heads_per_layer"], plan["value_heads_per_layer"]
    assert sum(keys) + sum(values) == 8 and min(keys + values) >= 1
    for layer, kept in zip(plan["layers"], zip(keys, values)):
        assert (len(layer["key_groups"]), len(layer["value_groups"])) == kept
        assert sorted(j for g in layer["key_groups"] for j in g) == [0, 1, 2, 3]
        assert all(0 <= e <= 1 for e in layer["key_group_errors"] + layer["value_group_errors"])
    assert set(plan["error_curves"]) == {"0.k", "0.v", "1.k", "1.v"}
    assert (out / "dha_plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info, source = describe(out), describe(src)
    assert info["layout"] == "dha" and info["key_heads_per_layer"] == keys
    assert info["kv_cache_bytes_per_token_bf16"] == source["kv_cache_bytes_per_token_bf16"] // 2


def test_separate_k_and_v_budgets(tiny, tmp_path, calib_file):
    out = convert(tiny("mha"), tmp_path / "dha", to="dha", k_budget=0.25, v_budget=0.75, calib=str(calib_file),
                  calib_tokens=1024, calib_seq_len=128)
    plan = read_json(out / "rehead.json")["plan"]
    assert sum(plan["key_heads_per_layer"]) == 2 and sum(plan["value_heads_per_layer"]) == 6


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kv_budget=1.5), "--kv-budget 1.5: must be in (0, 1]"),
        (dict(kv_budget=0), "--kv-budget 0: must be in (0, 1]"),
        (dict(kv_budget=0.1), "below one head per layer; the smallest budget is 0.3333"),
        (dict(), "needs a budget"),
        (dict(kv_budget=0.5, k_budget=0.5), "not both"),
        (dict(kv_budget=0.5, uniform=True), "budgets that divide evenly: 0.3333, 1"),
        (dict(kv_budget=0.5, calib_tokens=40), "need at least 74 tokens"),
    ],
)
def test_bad_budgets_are_refused(tiny, tmp_path, options, message):
    src = tiny("odd")  # 3 KV heads, hidden size 36
    with pytest.raises(ReheadError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        convert(src, tmp_path / "out", to="dha", **options)
    assert not (tmp_path / "out").exists()
