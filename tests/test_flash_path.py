"""The layouts under kernels that need equal query/key/value head dims (flash-attention).

On the CPU the flash kernel is replaced by sdpa behind a registered attention function that refuses
what flash-attention refuses (value heads wider than the query and key heads, or K and V head
counts that differ), so every layout's flash code path runs and is compared with the sdpa one.
With flash-attn installed and a GPU, the real kernel is compared too.
"""

import pytest
import torch
from test_dha import dha_model
from test_gda import gda_model
from test_moh_layout import moh_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils import is_flash_attn_2_available

EQUAL_HEAD_DIMS = "sdpa_equal_head_dims"

MODELS = {
    "gda-noise-spans-3-values": lambda attn: gda_model(6, 6, 2, attn=attn),  # noise value width 3·d
    "gda-noise-spans-2-values": lambda attn: gda_model(6, 3, 1, attn=attn, form="diff", subln=True,
                                                       lambda_init=[0.2, 0.4]),
    "gda-noise-in-kv-group": lambda attn: gda_model(6, 2, 2, attn=attn),
    "moh": lambda attn: moh_model("query-norm", active=3, attn=attn),
    "moh-learned": lambda attn: moh_model("learned", active=4, attn=attn),
    "dha": lambda attn: dha_model([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2], attn=attn),
}


def equal_head_dims(module, query, key, value, attention_mask, **kwargs):
    """sdpa, refusing what flash-attention cannot take."""
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        raise AssertionError(f"head dims differ: q {query.shape[-1]}, k {key.shape[-1]}, v {value.shape[-1]}")
    if key.shape[1] != value.shape[1] or query.shape[1] % key.shape[1]:
        raise AssertionError(f"head counts: q {query.shape[1]}, k {key.shape[1]}, v {value.shape[1]}")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def registered():
    AttentionInterface.register(EQUAL_HEAD_DIMS, equal_head_dims)
    AttentionMaskInterface.register(EQUAL_HEAD_DIMS, sdpa_mask)
    yield
    AttentionInterface._global_mapping.pop(EQUAL_HEAD_DIMS)
    AttentionMaskInterface._global_mapping.pop(EQUAL_HEAD_DIMS)


def test_the_model_reaches_the_stand_in_with_equal_head_dims_and_its_one_call_path_would_not(monkeypatch):
    """The equal-head-dims path is the model's own: each layer calls the stand-in twice (signal heads, then
    the noise heads repeated over their 3 V heads each), always with equal head dims; the one-call noise
    path of sdpa and eager (values 3·d wide) meets the stand-in's refusal."""
    from rehead.layouts import modeling_gda

    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[1], query.shape[-1], key.shape[-1], value.shape[-1]))
        return equal_head_dims(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, EQUAL_HEAD_DIMS, recording)
    model = gda_model(6, 6, 2, attn=EQUAL_HEAD_DIMS)
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        model(ids)
    assert calls == [(6, 4, 4, 4), (6, 4, 4, 4)] * 2  # 2 layers × (6 signal heads, 2 noise heads × 3 V heads)
    monkeypatch.setattr(modeling_gda, "WIDE_VALUE_KERNELS", (*modeling_gda.WIDE_VALUE_KERNELS, EQUAL_HEAD_DIMS))
    with pytest.raises(AssertionError, match="head dims differ: q 4, k 4, v 12"), torch.no_grad():
        model(ids)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_equal_head_dims_path_matches_sdpa(name, monkeypatch):
    calls = []
    monkeypatch.setitem(AttentionInterface._global_mapping, EQUAL_HEAD_DIMS,
                        lambda *args, **kwargs: calls.append(1) or equal_head_dims(*args, **kwargs))
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = MODELS[name]("sdpa")(ids).logits
        got = MODELS[name](EQUAL_HEAD_DIMS)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(calls) >= 2  # every layer (2) went through the strict stand-in, not around it


@pytest.mark.parametrize("name", ["gda-noise-spans-3-values", "dha"])
def test_the_equal_head_dims_path_decodes_with_the_cache(name):
    model = MODELS[name](EQUAL_HEAD_DIMS)
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        full = MODELS[name]("sdpa")(out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, 1), full[:, prompt.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() and is_flash_attn_2_available()),
                    reason="needs flash-attn and a GPU")
@pytest.mark.parametrize("name", list(MODELS))
def test_flash_attention_2_matches_sdpa(name):
    ids = torch.randint(0, 50, (2, 64), device="cuda")
    with torch.no_grad():
        expected = MODELS[name]("sdpa").to("cuda", torch.bfloat16)(ids).logits.float()
        got = MODELS[name]("flash_attention_2").to("cuda", torch.bfloat16)(ids).logits.float()
    torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)
