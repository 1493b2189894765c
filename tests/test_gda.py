"""GDA: the modeling code against the formula, gradients at λ = 0, conversions, bad input."""

import json
import math

import pytest
import torch
from conftest import assert_matches_reference, logits, read_json
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file

import rehead  # noqa: F401
import rehead.layouts.modeling_gda as modeling_gda
import rehead.layouts.modeling_stack as modeling_stack
from rehead.convert import convert
from rehead.describe import describe
from rehead.errors import ReheadError
from rehead.layouts.configuration_gda import GDAConfig
from rehead.layouts.modeling_gda import GDAForCausalLM

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def gda_model(heads=6, kv=2, noise=2, subln=False, attn="sdpa", lam=0.4, seed=0, form="plain", lambda_init=0.0):
    config = GDAConfig(vocab_size=50, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=4, attention_bias=True,
                       max_position_embeddings=64, gda_noise_heads=noise, gda_subln=subln, eos_token_id=None,
                       gda_lambda=form, gda_lambda_init=lambda_init)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = GDAForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "subln" in name:
                param.normal_(0, 0.5)
            if name.endswith("diff_lambda"):
                param.uniform_(-lam, lam)
            if "lambda_q" in name or "lambda_k" in name:  # independent factors: λ away from λ_init
                param.normal_(0, lam)
    return model


def reference_lambda(attn, i):
    """λ_i from the parameters: plain, or DIFF's exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init of the layer."""
    p = {n: t.double() for n, t in attn.named_parameters()}
    if attn.config.gda_lambda == "plain":
        return p["diff_lambda"][i]
    lambda_init = attn.config.gda_lambda_init[attn.layer_idx]
    return (p["lambda_q1"] @ p["lambda_k1"]).exp() - (p["lambda_q2"] @ p["lambda_k2"]).exp() + lambda_init


def reference_logits(model, ids):
    """out_i = (A1_i − λ_i·A2_n(i))·V_i, one token and one head at a time, float64."""
    from test_moh_layout import head_norm, rope

    inner, config = model.model, model.config
    heads, kv, noise = config.num_attention_heads, config.num_key_value_heads, config.gda_noise_heads
    h = inner.embed_tokens.weight.double()[ids]
    cos, sin = (t[0].double() for t in inner.rotary_emb(h[None].float(), torch.arange(len(ids))[None]))
    for layer in inner.layers:
        attn = layer.self_attn
        p = {n: t.double() for n, t in attn.named_parameters()}
        x = layer.input_layernorm.double()(h)
        d, seq = attn.head_dim, len(ids)

        def project(name):
            return (x @ p[f"{name}.weight"].T + p[f"{name}.bias"]).view(seq, -1, d)

        q, k, v, nq, nk = (project(n) for n in ("q_proj", "k_proj", "v_proj", "noise.q_proj", "noise.k_proj"))
        eps = config.rms_norm_eps  # the per-head q/k norms of a Qwen3 source, the noise heads' their own
        q, k = head_norm(p, "q_norm", q, eps), head_norm(p, "k_norm", k, eps)
        nq, nk = head_norm(p, "noise.q_norm", nq, eps), head_norm(p, "noise.k_norm", nk, eps)

        def attention_map(query, keys, t):
            scores = torch.stack([rope(keys[s], cos[s], sin[s]) for s in range(t + 1)]) @ rope(query, cos[t], sin[t])
            return torch.softmax(scores / math.sqrt(d), 0)

        out = torch.zeros(seq, heads * d, dtype=torch.float64)
        for t in range(seq):
            for i in range(heads):
                j, n = i // (heads // kv), i // (heads // noise)
                a1 = attention_map(q[t, i], k[:, j], t)
                a2 = attention_map(nq[t, n], nk[:, n], t)
                head = (a1 - reference_lambda(attn, i) * a2) @ v[: t + 1, j]
                if config.gda_subln:
                    head = (1 - config.gda_lambda_init[attn.layer_idx]) * attn.subln.double()(head)
                out[t, i * d : (i + 1) * d] = head
        h = h + out @ p["o_proj.weight"].T + p["o_proj.bias"]
        h = h + layer.mlp.double()(layer.post_attention_layernorm.double()(h))
    result = model.lm_head.double()(inner.norm.double()(h))
    model.float()
    return result


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", [(6, 2, 2), (6, 6, 2), (6, 3, 1), (6, 2, 6)], ids=["in-kv", "mha-span", "one", "per-head"])
@pytest.mark.parametrize("subln", [False, True])
def test_fast_path_matches_the_formula(attn, shape, subln):
    heads, kv, noise = shape
    model = gda_model(heads, kv, noise, subln=subln, attn=attn)
    ids = torch.randint(0, 50, (2, 7))
    assert_matches_reference(model, reference_logits, ids)


@pytest.mark.parametrize("shape", [(6, 2, 2), (6, 6, 2)], ids=["in-kv", "mha-span"])
@pytest.mark.parametrize("subln", [False, True])
def test_diff_lambda_and_the_sub_norm_scale_match_the_formula(shape, subln):
    """DIFF's λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init(l), and the sub-norm's (1 − λ_init(l)), per layer."""
    heads, kv, noise = shape
    model = gda_model(heads, kv, noise, subln=subln, form="diff", lambda_init=[0.2, 0.5])
    attn = model.model.layers[1].self_attn
    assert not hasattr(attn, "diff_lambda") and attn.lambda_init == 0.5
    ids = torch.randint(0, 50, (2, 7))
    assert_matches_reference(model, reference_logits, ids)


def test_lambda_init_follows_the_diff_schedule():
    """λ_init(l) = 0.8 − 0.6·exp(−0.3·(l − 1)), l from 1: the DIFF paper's values, not the 0-based index's."""
    from rehead.layouts.configuration_gda import diff_lambda_init

    assert [round(diff_lambda_init(layer), 5) for layer in (1, 2, 3, 10)] == [0.2, 0.35551, 0.47071, 0.75968]


def test_configs_with_one_lambda_init_still_load(tmp_path):
    """Configs written before the per-layer schedule hold one number: it applies to every layer."""
    model = gda_model(subln=True)
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(gda_lambda_init=0.0)
    del config["gda_lambda"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    again = GDAConfig.from_pretrained(tmp_path)
    assert (again.gda_lambda, again.gda_lambda_init) == ("plain", [0.0, 0.0])
    with pytest.raises(StrictDataclassClassValidationError, match="gda_lambda_init has 3 values for 2 layers"):
        GDAConfig(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, gda_noise_heads=2,
                  gda_lambda_init=[0.1, 0.2, 0.3])


def test_noise_map_is_computed_once_per_noise_head(monkeypatch):
    model = gda_model(6, 6, 2, attn="eager")  # MHA: each noise head serves 3 signal heads with 3 different Vs
    calls = []
    original = modeling_stack.eager_attention_forward

    def counting(module, query, key, value, *args, **kwargs):
        calls.append((type(module).__name__, query.shape[1], value.shape[-1]))
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(modeling_stack, "eager_attention_forward", counting)
    monkeypatch.setattr(modeling_gda, "DECODE_QUERY_TOKENS", 0)  # the attention kernels' path
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 5)))
    noise_calls = [c for c in calls if c[0] == "NoiseAttention"]
    assert noise_calls == [("NoiseAttention", 2, 3 * 4)] * 2  # 2 maps per layer, each applied to 3 value heads


def test_generate_with_cache_equals_full_forward():
    model = gda_model(6, 6, 2)
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        full = model(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, prompt.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)


def test_lambda_learns_from_step_zero_and_then_the_noise_heads(tiny, tmp_path):
    out = convert(tiny("gqa"), tmp_path / "gda", to="gda", ratio=3)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).train()
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.diff_lambda, torch.zeros(6))
    model(IDS, labels=IDS).loss.backward()
    assert attn.diff_lambda.grad.abs().min() > 0
    assert attn.noise.q_proj.weight.grad.abs().max() == 0 and attn.noise.k_proj.weight.grad.abs().max() == 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step()
    optimizer.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    assert attn.noise.q_proj.weight.grad.abs().max() > 0 and attn.noise.k_proj.weight.grad.abs().max() > 0


@pytest.mark.parametrize("variant, ratio", [("gqa", 3), ("mha", 2)])
def test_diff_lambda_starts_at_the_source_with_a_live_gradient(tiny, tmp_path, calib_file, variant, ratio):
    """--lambda diff: λ_q2 = λ_q1, λ_k2 = λ_k1 and λ_init = 0 give λ = 0 exactly (the source's function),
    and every factor of λ gets a gradient at step 0, so one step moves λ away from 0."""
    src = tiny(variant)
    out = convert(src, tmp_path / "gda", to="gda", ratio=ratio, check_identity=True, calib=str(calib_file),
                  calib_tokens=256, calib_seq_len=128, **{"lambda": "diff"})
    config, record = read_json(out / "config.json"), read_json(out / "rehead.json")
    assert config["gda_lambda"] == "diff" and config["gda_lambda_init"] == [0.0, 0.0]
    assert record["options"]["lambda"] == "diff" and record["plan"]["lambda"] == "diff"
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5
    weights = load_file(out / "model.safetensors")
    assert not any(name.endswith("diff_lambda") for name in weights)
    q1, k1 = weights["model.layers.0.self_attn.lambda_q1"], weights["model.layers.0.self_attn.lambda_k1"]
    assert q1.abs().min() > 0 and not torch.equal(q1, weights["model.layers.1.self_attn.lambda_q1"])
    assert torch.equal(q1, weights["model.layers.0.self_attn.lambda_q2"])
    assert torch.equal(k1, weights["model.layers.0.self_attn.lambda_k2"])
    again = convert(src, tmp_path / "again", to="gda", ratio=ratio, lambda_="diff")  # seeded: the same every run
    assert torch.equal(load_file(again / "model.safetensors")["model.layers.0.self_attn.lambda_q1"], q1)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).train()
    attn = model.model.layers[0].self_attn
    assert attn.lambdas().abs().max() == 0
    model(IDS, labels=IDS).loss.backward()
    factors = [getattr(attn, f"lambda_{name}") for name in ("q1", "k1", "q2", "k2")]
    assert all(f.grad.abs().max() > 0 for f in factors)
    torch.testing.assert_close(attn.lambda_q2.grad, -attn.lambda_q1.grad)  # ∂λ/∂λ_q2 = −∂λ/∂λ_q1 at the start
    torch.optim.SGD(factors, lr=0.1).step()
    assert attn.lambdas().abs().min() > 0


def test_trained_lambda_factors_load_as_they_are(tiny, tmp_path, calib_file):
    """Loading does not re-tie λ_q2 to λ_q1 (the start's initialisation) once training has moved them apart,
    with rehead installed or through the checkpoint's own code."""
    from conftest import load_without_rehead
    from transformers import AutoModelForCausalLM

    out = convert(tiny("gqa"), tmp_path / "gda", to="gda", ratio=3, lambda_="diff")
    weights = load_file(out / "model.safetensors")
    for name in [n for n in weights if "lambda_" in n]:
        weights[name] = torch.randn_like(weights[name])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, param in model.named_parameters():
        if "lambda_" in name:
            assert torch.equal(param.data, weights[name])
    ids = [[5, 17, 99, 3, 250, 42, 7]]
    report = load_without_rehead(out, ids, tmp_path)
    torch.testing.assert_close(torch.tensor(report["logits"]), logits(out, torch.tensor(ids))[0, -1])


def test_subln_uses_the_diff_depth_schedule(tiny, tmp_path):
    """--subln scales each head's sub-norm by 1 − λ_init(l) with DIFF's schedule; with --lambda diff the
    start is DIFF's own, λ = λ_init(l)."""
    from transformers import AutoModelForCausalLM

    from rehead.layouts.configuration_gda import diff_lambda_init

    src = tiny("gqa", layers=3)
    schedule = [diff_lambda_init(layer) for layer in (1, 2, 3)]
    plain = convert(src, tmp_path / "plain", to="gda", ratio=3, subln=True)
    assert read_json(plain / "config.json")["gda_lambda_init"] == pytest.approx([0.2, 0.35551, 0.47071], abs=1e-5)
    assert read_json(plain / "config.json")["gda_lambda_init"] == schedule
    diff = convert(src, tmp_path / "diff", to="gda", ratio=3, subln=True, lambda_="diff")
    model = AutoModelForCausalLM.from_pretrained(diff)
    lambdas = [layer.self_attn.lambdas() for layer in model.model.layers]
    assert [x.unique().item() for x in lambdas] == pytest.approx(schedule, abs=1e-7)
    # the scale is applied: the converted model equals its own layers recomputed with 1 − λ_init(l)
    model = AutoModelForCausalLM.from_pretrained(plain).eval()
    with torch.no_grad():
        expected = model(IDS).logits
        for layer in model.model.layers:
            layer.self_attn.lambda_init = 0.0
        unscaled = model(IDS).logits
    assert (expected - unscaled).abs().max() > 1e-3


@pytest.mark.parametrize("variant, ratio", [("mha", 2), ("gqa", 3), ("gqa", 6), ("odd", 9), ("qwen2", 2),
                                            ("mqa-tied", 5), ("mistral", 1)])
def test_grow_at_lambda_zero_is_the_source(tiny, tmp_path, calib_file, variant, ratio):
    src = tiny(variant)
    out = convert(src, tmp_path / "gda", to="gda", ratio=ratio, check_identity=True, calib=str(calib_file),
                  calib_tokens=256, calib_seq_len=128)
    config = read_json(out / "config.json")
    assert config["gda_noise_heads"] == config["num_attention_heads"] // ratio
    assert read_json(out / "rehead.json")["identity_error_per_layer"] == pytest.approx([0, 0], abs=1e-5)
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


def test_check_identity_catches_a_broken_conversion(tiny, tmp_path, calib_file, monkeypatch):
    from rehead.convert import gda

    original = gda.GDARewriter.rewrite_layer

    def broken(self, layer):
        tensors, plan = original(self, layer)
        tensors["self_attn.diff_lambda"] = torch.full_like(tensors["self_attn.diff_lambda"], 0.5)
        return tensors, plan

    monkeypatch.setattr(gda.GDARewriter, "rewrite_layer", broken)
    with pytest.raises(ReheadError, match="layer 0 differs from the source"):
        convert(tiny("gqa"), tmp_path / "gda", to="gda", ratio=3, check_identity=True, calib=str(calib_file),
                calib_tokens=256, calib_seq_len=128)
    assert not (tmp_path / "gda").exists()


def test_repurpose_turns_the_least_important_head_into_the_noise_head(tiny, tmp_path, calib_file):
    src = tiny("mha")  # 4 heads, 4 KV heads
    tensors = load_file(src / "model.safetensors")
    for layer, quiet in ((0, 1), (1, 3)):  # a head whose o_proj columns are tiny contributes least
        o = tensors[f"model.layers.{layer}.self_attn.o_proj.weight"]
        o[:, quiet * 8 : (quiet + 1) * 8] *= 1e-3
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = convert(src, tmp_path / "gda", to="gda", ratio=3, mode="repurpose", calib=str(calib_file),
                  calib_tokens=256, calib_seq_len=128)
    plan = read_json(out / "rehead.json")["plan"]
    assert plan["repurposed_heads_per_layer"] == [[1], [3]]
    config = read_json(out / "config.json")
    assert (config["num_attention_heads"], config["gda_noise_heads"], config["num_key_value_heads"]) == (3, 1, 3)
    reference = logits(src, IDS)
    # the dropped head barely mattered: measured 1.7e-4 (CPU-2, 2026-12-02), where the logits reach 0.40
    assert (logits(out, IDS) - reference).abs().max() < 1e-3
    weights = load_file(out / "model.safetensors")
    source_q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(weights["model.layers.0.self_attn.noise.q_proj.weight"], source_q[8:16])


def test_subln_changes_the_function_but_loads(tiny, tmp_path):
    src = tiny("gqa")
    out = convert(src, tmp_path / "gda", to="gda", ratio=3, subln=True)
    assert read_json(out / "config.json")["gda_subln"] is True
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() > 1e-3


def test_inspect_shows_noise_heads_lambda_and_cache(tiny, tmp_path):
    src = tiny("gqa")  # 6 heads, 2 KV heads, head_dim 8, 2 layers
    out = convert(src, tmp_path / "gda", to="gda", ratio=3)
    info = describe(out)
    assert info["layout"] == "gda" and info["options"]["noise_heads"] == 2 and info["options"]["ratio"] == 3
    assert info["options"]["lambda_max_abs"] == 0.0
    assert info["key_heads_per_layer"] == [4, 4] and info["value_heads_per_layer"] == [2, 2]
    assert info["kv_cache_bytes_per_token_bf16"] == 2 * (4 + 2) * 8 * 2
    diff = describe(convert(src, tmp_path / "diff", to="gda", ratio=3, subln=True, lambda_="diff"))
    assert diff["options"]["lambda"] == "diff"
    assert diff["options"]["lambda_max_abs"] == pytest.approx(0.8 - 0.6 * math.exp(-0.3), abs=1e-6)  # λ_init(2)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(), "needs --ratio G"),
        (dict(ratio=0), "--ratio 0: must be at least 1"),
        (dict(ratio=12), "--ratio 12: larger than the 9 heads"),
        (dict(ratio=2), "--ratio 2: groups of 2 heads do not tile 9 heads in KV groups of 3; values that fit \\(grow\\): 1, 3, 9"),
        (dict(ratio=3, mode="repurpose"), "values that fit \\(repurpose\\): 2"),
        (dict(ratio=3, subln=True, check_identity=True), "--subln adds a per-head RMSNorm"),
        (dict(ratio=2, mode="repurpose", check_identity=True), "holds only for --mode grow"),
    ],
)
def test_bad_ratios_are_refused(tiny, tmp_path, options, message):
    with pytest.raises(ReheadError, match=message):
        convert(tiny("odd"), tmp_path / "out", to="gda", **options)
    assert not (tmp_path / "out").exists()
