"""A head_dim of its own (Qwen3's shape: hidden 64, 4 heads of 32, so heads·head_dim ≠ hidden) in every
layout's modeling: each identity setting is the LLaMA of the same weights to 1e-5, and each path (eager,
sdpa, DHA's fused and gathered paths, GDA's combined decode and kernel paths, the equal-head-dims path
flash-attention takes, the static cache) matches the layout's reference."""

import pytest
import torch
from conftest import assert_matches_reference, randomise
from test_dha import reference_logits as dha_reference
from test_flash_path import EQUAL_HEAD_DIMS, registered  # noqa: F401 (the fixture registers the stand-in kernel)
from test_gda import reference_logits as gda_reference
from test_moh_layout import reference_logits as moh_reference
from test_serving import generated
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import rehead.layouts.modeling_dha as modeling_dha
import rehead.layouts.modeling_gda as modeling_gda
from rehead.layouts.configuration_deci import DeciLMConfig
from rehead.layouts.configuration_dha import DHAConfig
from rehead.layouts.configuration_gda import GDAConfig
from rehead.layouts.configuration_moh import MoHConfig
from rehead.layouts.modeling_deci import DeciLMForCausalLM
from rehead.layouts.modeling_dha import DHAForCausalLM
from rehead.layouts.modeling_gda import GDAForCausalLM
from rehead.layouts.modeling_moh import MoHForCausalLM

SHAPE = dict(vocab_size=50, hidden_size=64, num_attention_heads=4, head_dim=32, intermediate_size=256,
             num_hidden_layers=2, attention_bias=True, max_position_embeddings=64, eos_token_id=None)
IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
PATHS = ["eager", "sdpa", EQUAL_HEAD_DIMS]


def build(model_class, config, attn, seed=0, also=lambda name: False):
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return randomise(model_class(config).eval(), also)


def llama(kv, attn="sdpa") -> LlamaForCausalLM:
    return build(LlamaForCausalLM, LlamaConfig(**SHAPE, num_key_value_heads=kv), attn)


def assert_is_llama(model, source, missing=()):
    """``model`` holding ``source``'s weights (and its own for ``missing``) computes ``source``'s logits."""
    result = model.load_state_dict(source.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(missing) and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, source(IDS).logits, atol=1e-5, rtol=1e-5)


def dha_identity(kv, key_perm, value_perm):
    """DHA with one fused head per KV head, K and V heads each stored in its own order: query head i reads
    key head key_perm[g(i)] and value head value_perm[g(i)]."""
    group = SHAPE["num_attention_heads"] // kv
    maps = [[perm[i // group] for i in range(SHAPE["num_attention_heads"])] for perm in (key_perm, value_perm)]
    layers = SHAPE["num_hidden_layers"]
    return DHAConfig(**SHAPE, num_key_value_heads=kv, key_heads_per_layer=[kv] * layers,
                     value_heads_per_layer=[kv] * layers, key_head_of_query=[maps[0]] * layers,
                     value_head_of_query=[maps[1]] * layers)


def permuted(state, kv, key_perm, value_perm):
    """``state``'s K (V) head j moved to slot key_perm[j] (value_perm[j])."""
    d, state = SHAPE["head_dim"], dict(state)
    for name, perm in (("k_proj", key_perm), ("v_proj", value_perm)):
        order = [perm.index(slot) for slot in range(kv)]
        rows = torch.cat([torch.arange(j * d, (j + 1) * d) for j in order])
        for key in [k for k in state if f".{name}." in k]:
            state[key] = state[key][rows]
    return state


@pytest.mark.parametrize("attn", PATHS)
@pytest.mark.parametrize("kv", [2, 4], ids=["gqa", "mha"])
def test_moh_with_every_head_active_is_the_llama(kv, attn):
    config = MoHConfig(**SHAPE, num_key_value_heads=kv, moh_active_heads=4, moh_shared_heads=[[1], [0, 2]],
                       moh_router="learned")
    assert_is_llama(build(MoHForCausalLM, config, attn, seed=1), llama(kv, attn))


@pytest.mark.parametrize("attn", PATHS)
@pytest.mark.parametrize("fused_up_to", [0, 64], ids=["gathered", "fused"])
@pytest.mark.parametrize("maps", ["grouped", "permuted"])
@pytest.mark.parametrize("kv", [2, 4], ids=["gqa", "mha"])
def test_dha_with_one_group_per_head_is_the_llama(monkeypatch, kv, maps, fused_up_to, attn):
    monkeypatch.setattr(modeling_dha, "FUSED_QUERY_TOKENS", fused_up_to)
    key_perm, value_perm = (list(range(kv)), list(range(kv))) if maps == "grouped" else \
        (list(range(kv))[::-1], [*range(1, kv), 0])
    model = build(DHAForCausalLM, dha_identity(kv, key_perm, value_perm), attn, seed=1)
    assert model.model.layers[0].self_attn.grouped == (maps == "grouped")
    source = llama(kv, attn)
    model.load_state_dict(permuted(source.state_dict(), kv, key_perm, value_perm))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, source(IDS).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", PATHS)
@pytest.mark.parametrize("decode_up_to", [0, 64], ids=["kernels", "combined"])
@pytest.mark.parametrize("kv", [2, 4], ids=["gqa", "mha"])
def test_gda_at_lambda_zero_is_the_llama(monkeypatch, kv, decode_up_to, attn):
    monkeypatch.setattr(modeling_gda, "DECODE_QUERY_TOKENS", decode_up_to)
    config = GDAConfig(**SHAPE, num_key_value_heads=kv, gda_noise_heads=2)
    model = build(GDAForCausalLM, config, attn, seed=1, also=lambda name: ".noise." in name)
    noise = [f"model.layers.{i}.self_attn.{name}" for i in range(2)
             for name in ("diff_lambda", "noise.q_proj.weight", "noise.q_proj.bias", "noise.k_proj.weight",
                          "noise.k_proj.bias")]
    assert_is_llama(model, llama(kv, attn), missing=noise)


@pytest.mark.parametrize("attn", PATHS)
def test_deci_with_the_sources_kv_heads_is_the_llama(attn):
    config = DeciLMConfig(**SHAPE, num_key_value_heads=2)
    assert config.intermediate_size_per_layer == [SHAPE["intermediate_size"]] * 2
    assert_is_llama(build(DeciLMForCausalLM, config, attn, seed=1), llama(2, attn))


def normed(name: str) -> bool:
    """The parameters a test randomises beyond the biases: Qwen3's q/k norms, DHA's query pair scales."""
    return name.endswith(("q_norm.weight", "k_norm.weight", "q_pair_scale"))


def moh(attn, router, qk_norm=False):
    config = MoHConfig(**SHAPE, num_key_value_heads=2, moh_active_heads=3, moh_shared_heads=[[1], [0]],
                       moh_router=router, qk_norm=qk_norm)
    return build(MoHForCausalLM, config, attn, also=lambda name: "router" in name or normed(name))


def dha(attn, qk_norm=False):  # layer 0: K and V grouped differently, not contiguous; layer 1: one K/V head for all
    config = DHAConfig(**SHAPE, num_key_value_heads=4, key_heads_per_layer=[3, 1], value_heads_per_layer=[2, 1],
                       key_head_of_query=[[0, 1, 0, 2], [0] * 4], value_head_of_query=[[1, 0, 0, 1], [0] * 4],
                       qk_norm=qk_norm, dha_query_scale=qk_norm)
    return build(DHAForCausalLM, config, attn, also=normed)


def gda(attn, kv=4, qk_norm=False):
    config = GDAConfig(**SHAPE, num_key_value_heads=kv, gda_noise_heads=2, gda_subln=True, qk_norm=qk_norm)
    return build(GDAForCausalLM, config, attn, also=lambda name: "diff_lambda" in name or "subln" in name or normed(name))


MODELS = {
    "moh-query-norm": lambda attn: moh(attn, "query-norm"),
    "moh-learned": lambda attn: moh(attn, "learned"),
    "dha": dha,
    "gda-noise-spans-2-values": gda,
    "gda-noise-in-kv-group": lambda attn: gda(attn, kv=2),
    # Qwen3's per-head q/k norms (the noise heads' own in GDA; DHA's query pair scales after them)
    "moh-query-norm-qk-norm": lambda attn: moh(attn, "query-norm", qk_norm=True),
    "moh-learned-qk-norm": lambda attn: moh(attn, "learned", qk_norm=True),
    "dha-qk-norm": lambda attn: dha(attn, qk_norm=True),
    "gda-qk-norm": lambda attn: gda(attn, kv=2, qk_norm=True),
}
REFERENCES = {"moh": moh_reference, "dha": dha_reference, "gda": gda_reference}


@pytest.mark.parametrize("attn", PATHS)
@pytest.mark.parametrize("decode_up_to", [0, 64], ids=["kernel-paths", "decode-paths"])
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_path_matches_the_reference(monkeypatch, name, decode_up_to, attn):
    monkeypatch.setattr(modeling_dha, "FUSED_QUERY_TOKENS", decode_up_to)
    monkeypatch.setattr(modeling_gda, "DECODE_QUERY_TOKENS", decode_up_to)
    assert_matches_reference(MODELS[name](attn), REFERENCES[name[:3]], IDS)


@pytest.mark.parametrize("name", list(MODELS))
def test_static_cache_generates_what_the_dynamic_cache_does(name):
    model = MODELS[name]("sdpa")
    dynamic, static = generated(model, "dynamic"), generated(model, "static")
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), atol=1e-5, rtol=1e-5)


def qwen3(kv, attn="sdpa") -> Qwen3ForCausalLM:
    config = Qwen3Config(**{k: v for k, v in SHAPE.items() if k != "attention_bias"}, attention_bias=True,
                         num_key_value_heads=kv)
    return build(Qwen3ForCausalLM, config, attn, also=normed)


@pytest.mark.parametrize("attn", PATHS)
@pytest.mark.parametrize("kv", [2, 4], ids=["gqa", "mha"])
def test_every_layout_at_its_identity_is_the_qwen3(monkeypatch, kv, attn):
    """With ``qk_norm`` every layout holds Qwen3's per-head norms where Qwen3ForCausalLM has them: MoH with
    every head active, DHA with one fused head per KV head (pair scales 1 + 0i), GDA at λ = 0."""
    monkeypatch.setattr(modeling_dha, "FUSED_QUERY_TOKENS", 64)
    source = qwen3(kv, attn)
    shape = dict(**SHAPE, num_key_value_heads=kv, qk_norm=True)
    assert_is_llama(build(MoHForCausalLM, MoHConfig(**shape, moh_active_heads=4, moh_shared_heads=[[1], [0, 2]]),
                          attn, seed=1), source)
    dha_model = build(DHAForCausalLM, DHAConfig(**shape, dha_query_scale=True), attn, seed=1)
    assert_is_llama(dha_model, source, missing=[f"model.layers.{i}.self_attn.q_pair_scale" for i in range(2)])
    noise = [f"model.layers.{i}.self_attn.{name}" for i in range(2)
             for name in ("diff_lambda", "noise.q_proj.weight", "noise.q_proj.bias", "noise.k_proj.weight",
                          "noise.k_proj.bias", "noise.q_norm.weight", "noise.k_norm.weight")]
    assert_is_llama(build(GDAForCausalLM, GDAConfig(**shape, gda_noise_heads=2), attn, seed=1, also=normed), source,
                    missing=noise)
