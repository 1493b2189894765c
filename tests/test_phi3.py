"""Phi-3 sources (``Phi3ForCausalLM``, fused ``qkv_proj`` and ``gate_up_proj``) on tiny random checkpoints built
with transformers' own Phi3Config: every identity setting reproduces the source's logits, an output in
Phi-3's own family is a stock Phi-3 again, and what the LLaMA form cannot hold is refused."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, byte_tokenizer, logits, randomise, read_json
from safetensors.torch import load_file, save_file
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from rehead import families
from rehead.convert import convert
from rehead.describe import describe
from rehead.errors import ReheadError

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
LONGROPE = dict(max_position_embeddings=64, original_max_position_embeddings=16,  # IDS (24 tokens) use long_factor
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.5, 2.5, 4.0, 6.0]})


def make_phi3(folder: Path, kv: int = 4, seed: int = 0, **overrides) -> Path:
    values = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=48,
                  num_hidden_layers=2, max_position_embeddings=512, pad_token_id=256, eos_token_id=256,
                  bos_token_id=None, tie_word_embeddings=False)
    values.update(copy.deepcopy(overrides))  # Phi3Config completes the RoPE dict it is given in place
    torch.manual_seed(seed)
    model = randomise(Phi3ForCausalLM(Phi3Config(**values)), also=lambda name: "norm" in name)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def llama_copy(phi3: Path, folder: Path) -> Path:
    """The same weights as a stock Llama checkpoint (split by hand, not by rehead)."""
    config = read_json(phi3 / "config.json")
    d, heads, kv = 32 // config["num_attention_heads"], config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}
    for name, t in load_file(phi3 / "model.safetensors").items():
        if name.endswith("qkv_proj.weight"):
            q, k, v = t.split([heads * d, kv * d, kv * d])
            tensors.update({name.replace("qkv", x): w.clone() for x, w in zip("qkv", (q, k, v))})
        elif name.endswith("gate_up_proj.weight"):
            gate, up = t.chunk(2)
            tensors.update({name.replace("gate_up", "gate"): gate.clone(), name.replace("gate_up", "up"): up.clone()})
        else:
            tensors[name] = t
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    llama = families.llama_config(config).to_dict()
    llama.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(llama))
    byte_tokenizer().save_pretrained(folder)
    return folder


IDENTITY = {
    "mha": dict(to="mha"),
    "moh-all-active": dict(to="moh", active_heads=4, shared_heads=1),
    "dha-budget-1": dict(to="dha", kv_budget=1.0),
    "dha-uniform-budget-1": dict(to="dha", kv_budget=1.0, uniform=True, fusion="mean"),
    "gda-grow": dict(to="gda", ratio=2),
}
PHI3_FORM = ("mha", "dha-uniform-budget-1")  # outputs in the source's own family


@pytest.mark.parametrize("rope", ["default", "longrope"])
@pytest.mark.parametrize("kv", [4, 2])
@pytest.mark.parametrize("setting", list(IDENTITY))
def test_identity_settings_reproduce_the_source(tmp_path, setting, kv, rope):
    src = make_phi3(tmp_path / "src", kv=kv, **(LONGROPE if rope == "longrope" else {}))
    out = convert(src, tmp_path / "out", **IDENTITY[setting])
    config = read_json(out / "config.json")
    names = set(load_file(out / "model.safetensors"))
    fused = {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"}
    if setting in PHI3_FORM:  # a stock Phi-3 again: fused projections, no custom code
        assert config["model_type"] == "phi3" and "auto_map" not in config and fused <= names
        assert not any("q_proj" in n or "gate_proj" in n for n in names)
    else:
        assert config["model_type"].startswith("rehead_") and not fused & names
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


def test_an_mha_source_to_mha_keeps_every_tensor(tmp_path):
    src = make_phi3(tmp_path / "src")
    out = convert(src, tmp_path / "mha", to="mha")
    source, converted = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(converted) == set(source) and all(torch.equal(converted[n], t) for n, t in source.items())


def test_calibrated_conversions_compute_what_the_llama_form_computes(tmp_path, calib_file):
    """Calibration, planning and refinement see the split tensors: each conversion of the Phi-3 checkpoint
    has the logits of the same conversion of its Llama copy, and the uniform one is a stock Phi-3."""
    src = make_phi3(tmp_path / "src", kv=4)
    llama = llama_copy(src, tmp_path / "llama")
    assert (logits(llama, IDS) - logits(src, IDS)).abs().max() <= 1e-5
    calib = dict(calib=str(calib_file), calib_tokens=512, calib_seq_len=128, refine_steps=3)
    for name, options in {"dha": dict(to="dha", kv_budget=0.5), "uniform": dict(to="dha", kv_budget=0.5, uniform=True)}.items():
        from_phi3 = convert(src, tmp_path / f"{name}-phi3", **options, **calib)
        from_llama = convert(llama, tmp_path / f"{name}-llama", **options, **calib)
        assert (logits(from_phi3, IDS) - logits(from_llama, IDS)).abs().max() <= 1e-5
    config = read_json(tmp_path / "uniform-phi3" / "config.json")
    assert config["model_type"] == "phi3" and config["num_key_value_heads"] == 2
    qkv = load_file(tmp_path / "uniform-phi3" / "model.safetensors")["model.layers.1.self_attn.qkv_proj.weight"]
    assert qkv.shape == ((4 + 2 * 2) * 8, 32)


def test_identity_is_checked_layer_by_layer_on_calibration_text(tmp_path, calib_file):
    src = make_phi3(tmp_path / "src", kv=2)
    out = convert(src, tmp_path / "moh", to="moh", active_heads=4, shared_heads=2, calib=str(calib_file),
                  calib_tokens=256, calib_seq_len=128, check_identity=True)
    assert max(read_json(out / "rehead.json")["identity_error_per_layer"]) < 1e-5


def partial_rotary_outside(config: dict) -> dict:
    """Phi-4-mini's spelling: partial_rotary_factor beside rope_scaling, which lacks it."""
    rope = {k: v for k, v in config.pop("rope_parameters").items() if k != "partial_rotary_factor"}
    return {**config, "rope_scaling": rope, "partial_rotary_factor": 0.75}


@pytest.mark.parametrize("change, message", [
    (partial_rotary_outside, "partial_rotary_factor 0.75: RoPE turns only that fraction"),
    (lambda c: {**c, "rope_parameters": {**c["rope_parameters"], "partial_rotary_factor": 0.5}},
     "partial_rotary_factor 0.5: RoPE turns only that fraction"),
    (lambda c: {**c, "sliding_window": 16}, "sliding_window=16 and max_position_embeddings=512: a token attends"),
    (lambda c: {**c, "intermediate_size": None}, "intermediate_size = None: must be a positive integer"),
    (lambda c: {**c, "num_key_value_heads": 1}, "qkv_proj.weight has 96 rows, but config.json's .* give 48"),
])
def test_what_the_llama_form_cannot_hold_is_refused(tmp_path, change, message):
    src = make_phi3(tmp_path / "src")
    (src / "config.json").write_text(json.dumps(change(read_json(src / "config.json"))))
    with pytest.raises(ReheadError, match=message):
        convert(src, tmp_path / "out", to="mha")
    assert not (tmp_path / "out").exists()


def test_a_window_that_spans_the_context_is_no_window(tmp_path):
    src = make_phi3(tmp_path / "src", sliding_window=512)
    out = convert(src, tmp_path / "moh", to="moh", active_heads=4, shared_heads=1)
    assert "sliding_window" not in read_json(out / "config.json")
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


def test_longrope_is_refused_by_the_deci_export_with_the_reason(tmp_path):
    src = make_phi3(tmp_path / "src", **LONGROPE)
    with pytest.raises(ReheadError, match="llama.cpp's DeciLM converter carries only rope_theta and llama3 scaling"):
        convert(src, tmp_path / "deci", to="dha", kv_budget=0.5, export="deci")


def test_the_hub_checkpoints_rope_scaling_is_read_as_phi3_reads_it():
    """Phi-3-mini-128k's config.json says ``rope_scaling: {"type": "longrope"}`` and keeps
    original_max_position_embeddings outside it; Phi3Config reads it from there, and so does the LLaMA form."""
    config = {"model_type": "phi3", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 48, "max_position_embeddings": 64, "original_max_position_embeddings": 16,
              "rope_theta": 5000.0, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}}
    llama = families.llama_config(config)
    assert llama.rope_parameters["rope_type"] == "longrope"
    assert llama.rope_parameters["original_max_position_embeddings"] == 16
    x, positions = torch.ones(1, 32, 8), torch.arange(32)[None]  # past 16 tokens: the long factors
    for got, expected in zip(LlamaRotaryEmbedding(llama)(x, positions), Phi3RotaryEmbedding(Phi3Config(**config))(x, positions)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_inspect_reads_a_phi3_source(tmp_path):
    info = describe(make_phi3(tmp_path / "src", kv=2))
    assert info["family"] == "Phi-3, Phi-3.5, Phi-4" and info["architecture"] == "Phi3ForCausalLM"
    assert (info["query_heads"], info["key_heads_per_layer"], info["head_dim"]) == (4, [2, 2], 8)
    per_head = 2 * 8 * 2  # one K or V head over 2 layers in bf16
    would = {flags: row["kv_cache_bytes_per_token_bf16"] for flags, row in info["if_converted"].items()}
    assert would == {"--to mha": 8 * per_head, "--to moh": 4 * per_head, "--to dha --kv-budget 0.5": 2 * per_head,
                     "--to gda --ratio 2": 6 * per_head}
