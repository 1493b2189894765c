"""Serving in transformers: the static cache of every layout, DHA's and GDA's decode paths (each cached
head read once), compiled decode."""

import inspect

import pytest
import torch
from conftest import assert_matches_reference
from test_dha import MAPS, dha_model, reference_logits
from test_gda import gda_model
from test_gda import reference_logits as gda_reference
from test_moh_layout import moh_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import rehead.layouts.modeling_dha as modeling_dha
import rehead.layouts.modeling_gda as modeling_gda
from rehead import text
from rehead.convert import convert
from rehead.layouts.modeling_cache import LayoutStaticCache
from rehead.layouts.modeling_dha import DHAAttention
from rehead.layouts.modeling_gda import GDAAttention

# K and V grouped differently, groups of unequal sizes (4, 1, 1 key heads; 1, 5 value heads)
UNEVEN = ([0, 0, 1, 0, 2, 0], [0, 1, 1, 1, 1, 1])
MODELS = {
    "moh-mha": lambda: moh_model("query-norm", active=3, heads=4, kv=4),
    "moh-gqa": lambda: moh_model("learned", active=4),
    "dha-grouped": lambda: dha_model(*MAPS["grouped"]),
    "dha-decoupled": lambda: dha_model(*MAPS["decoupled"]),  # 3 key heads, 2 value heads
    "dha-uneven": lambda: dha_model(*UNEVEN),
    "gda-gqa": lambda: gda_model(6, 2, 2),
    "gda-mha": lambda: gda_model(6, 6, 2),
}
PROMPT = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
PADDING = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # the first row is left-padded


def generated(model, impl, padded=True, **kwargs):
    mask = PADDING if padded else torch.ones_like(PADDING)  # no padding: sdpa gets no mask at the prefill
    return model.generate(PROMPT, attention_mask=mask, max_new_tokens=8, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0, cache_implementation=impl, **kwargs)


def returned_cache(out):
    return out.cache if "cache" in out else out.past_key_values  # renamed in transformers 5.24


def cache_kwarg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_static_cache_generates_what_the_dynamic_cache_does(name, padded):
    model = MODELS[name]()
    dynamic, static = generated(model, "dynamic", padded), generated(model, "static", padded)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), atol=1e-5, rtol=1e-5)
    cache = returned_cache(static)
    assert isinstance(cache, LayoutStaticCache)
    for layer, cached in zip(model.model.layers, cache.layers):
        assert (cached.keys.shape[1], cached.values.shape[1]) == layer.self_attn.cache_heads


def test_cache_heads_are_the_layouts_own():
    assert dha_model(*MAPS["decoupled"]).model.layers[0].self_attn.cache_heads == (3, 2)
    assert gda_model(6, 2, 6).model.layers[0].self_attn.cache_heads == (2 + 6, 2)  # noise keys beside signal keys
    assert moh_model(heads=6, kv=2).model.layers[0].self_attn.cache_heads == (2, 2)  # every head's K/V


def test_static_cache_survives_early_initialization():
    """Chunked prefill initialises the cache before the first update, with one shape for K and V."""
    model = MODELS["dha-decoupled"]()
    dynamic = generated(model, "dynamic")
    chunked = generated(model, "static", prefill_chunk_size=4)
    assert torch.equal(chunked.sequences, dynamic.sequences)


# ---- DHA: decoding against the fused heads ----


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("maps", ["decoupled", "uneven"])
@pytest.mark.parametrize("fused_up_to", [0, 64], ids=["gathered", "fused"])
def test_both_dha_paths_match_the_reference(monkeypatch, attn, maps, fused_up_to):
    monkeypatch.setattr(modeling_dha, "FUSED_QUERY_TOKENS", fused_up_to)
    calls = []
    fused = DHAAttention.fused_attention
    monkeypatch.setattr(DHAAttention, "fused_attention", lambda self, *a: calls.append(1) or fused(self, *a))
    model = dha_model(*(UNEVEN if maps == "uneven" else MAPS[maps]), attn=attn)
    ids = torch.randint(0, 50, (2, 7))
    assert_matches_reference(model, reference_logits, ids)
    assert len(calls) == (1 if fused_up_to else 0)  # layer 0 is not grouped; layer 1 is one K/V head for all


@pytest.mark.parametrize("layout", ["dha", "gda"])
def test_eager_weights_are_the_same_on_both_paths(monkeypatch, layout):
    """With output_attentions, DHA's fused path returns the gathered per-query-head weights and GDA's
    combined path the signal maps: what the kernels' path returns."""
    model, module, threshold = {
        "dha": (lambda: dha_model(*UNEVEN, attn="eager"), modeling_dha, "FUSED_QUERY_TOKENS"),
        "gda": (lambda: gda_model(6, 2, 2, attn="eager"), modeling_gda, "DECODE_QUERY_TOKENS"),
    }[layout]
    model = model()
    ids = torch.randint(0, 50, (2, 7))
    weights = {}
    for up_to in (0, 64):
        monkeypatch.setattr(module, threshold, up_to)
        with torch.no_grad():
            weights[up_to] = model(ids, output_attentions=True).attentions[0]
    assert weights[0].shape == (2, 6, 7, 7)
    torch.testing.assert_close(weights[64], weights[0], atol=1e-6, rtol=1e-6)


def test_decoding_reads_only_the_fused_heads(monkeypatch):
    """Decode steps of a non-grouped layer attend against the cache's own 3 key and 2 value heads;
    a prompt longer than FUSED_QUERY_TOKENS goes to the attention kernel with K/V gathered per query head."""
    model = dha_model(*MAPS["decoupled"])
    seen = []
    fused = DHAAttention.fused_attention

    def spy_fused(self, query, key, value, mask):
        seen.append(("fused", self.layer_idx, query.shape[2], key.shape[1], value.shape[1]))
        return fused(self, query, key, value, mask)

    def spy_kernel(attention, module, query, key, value, *args, **kwargs):
        seen.append(("kernel", attention.layer_idx, query.shape[2], key.shape[1], value.shape[1]))
        return attend(attention, module, query, key, value, *args, **kwargs)

    attend = modeling_dha.attend
    monkeypatch.setattr(DHAAttention, "fused_attention", spy_fused)
    monkeypatch.setattr(modeling_dha, "attend", spy_kernel)
    prompt = torch.randint(0, 50, (2, modeling_dha.FUSED_QUERY_TOKENS + 4))
    model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    layer0 = [call for call in seen if call[1] == 0]
    assert layer0 == [("kernel", 0, prompt.shape[1], 6, 6)] + [("fused", 0, 1, 3, 2)] * 2


# ---- GDA: the maps combined before V ----


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", [(6, 2, 2), (6, 6, 2), (6, 3, 1), (6, 2, 6)],
                         ids=["in-kv", "mha-span", "one", "per-head"])
@pytest.mark.parametrize("decode_up_to", [0, 64], ids=["kernels", "combined"])
def test_both_gda_paths_match_the_formula(monkeypatch, attn, shape, decode_up_to):
    monkeypatch.setattr(modeling_gda, "DECODE_QUERY_TOKENS", decode_up_to)
    calls = []
    combined = GDAAttention.decode_attention
    monkeypatch.setattr(GDAAttention, "decode_attention", lambda self, *a: calls.append(1) or combined(self, *a))
    model = gda_model(*shape, subln=True, attn=attn)
    ids = torch.randint(0, 50, (2, 7))
    assert_matches_reference(model, gda_reference, ids)
    assert len(calls) == (2 if decode_up_to else 0)


def test_gda_decoding_reads_the_cached_keys_as_they_are(monkeypatch):
    """A decode step scores the cache's own key tensor (signal and noise keys, no slice or copy of it)
    and its own value tensor; a prompt longer than DECODE_QUERY_TOKENS goes to the attention kernels."""
    model = gda_model(6, 2, 2)
    seen = []
    combined = GDAAttention.decode_attention

    def spy(self, query, keys, values, noise_query, mask):
        layer = cache.layers[self.layer_idx]
        seen.append((query.shape[2], keys.data_ptr() == layer.keys.data_ptr() and keys.shape == layer.keys.shape,
                     values.data_ptr() == layer.values.data_ptr()))
        return combined(self, query, keys, values, noise_query, mask)

    monkeypatch.setattr(GDAAttention, "decode_attention", spy)
    prompt = torch.randint(0, 50, (2, modeling_gda.DECODE_QUERY_TOKENS + 4))
    cache = model.static_cache(prompt.shape[1] + 3)
    model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, **{cache_kwarg(model): cache})
    assert seen == [(1, True, True)] * 2 * 2  # two decode steps of both layers
    assert cache.layers[0].keys.shape[1] == 2 + 2


# ---- compiled decode ----


@pytest.mark.parametrize("name", ["moh-gqa", "dha-decoupled", "gda-mha"])
def test_decode_step_compiles_into_one_graph(name):
    """torch.compile(fullgraph=True) traces a static-cache decode step without a graph break, and the
    compiled step's logits are the full forward's."""
    model = MODELS[name]()
    cache = model.static_cache(PROMPT.shape[1] + 1)
    with torch.no_grad():
        prefill = model(PROMPT, use_cache=True, **{cache_kwarg(model): cache})
        token = prefill.logits[:, -1:].argmax(-1)
        step = torch.compile(model.forward, backend="eager", fullgraph=True)
        position = torch.full((2, 1), PROMPT.shape[1])
        logits = step(token, position_ids=position, use_cache=True, **{cache_kwarg(model): cache}).logits
        full = model(torch.cat([PROMPT, token], 1)).logits
    torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


# ---- the real model's conversions ----


@pytest.fixture(scope="module")
def conversions(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("serving")
    calib = dict(calib_tokens=1280, calib_seq_len=128)  # DHA needs 2·(576 + 1) = 1154 at this width
    return {
        "moh": convert("smollm2-135m", work / "moh", to="moh", router="learned", **calib),
        # the closed form alone: serving reads the fused heads whatever refined their weights
        "dha": convert("smollm2-135m", work / "dha", to="dha", kv_budget=0.5, refine_steps=0, **calib),
        "gda": convert("smollm2-135m", work / "gda", to="gda", ratio=3),
    }


@pytest.mark.real
@pytest.mark.parametrize("layout", ["moh", "dha", "gda"])
def test_static_cache_on_the_real_conversions(smollm2, conversions, layout):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = text.blocks(tokenizer, "shakespeare-heldout", 2 * 48, 48)
    model = AutoModelForCausalLM.from_pretrained(conversions[layout], dtype=torch.float32).eval()
    if layout == "dha":
        counts = {(a.key_heads, a.value_heads) for a in (layer.self_attn for layer in model.model.layers)}
        assert any(k != v for k, v in counts)  # some layer keeps other numbers of K and V heads
    runs = {impl: model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id,
                                 cache_implementation=impl) for impl in ("dynamic", "static")}
    assert torch.equal(runs["static"].sequences, runs["dynamic"].sequences)
    torch.testing.assert_close(torch.stack(runs["static"].logits, 1), torch.stack(runs["dynamic"].logits, 1),
                               atol=1e-4, rtol=1e-4)
    assert isinstance(returned_cache(runs["static"]), LayoutStaticCache)
