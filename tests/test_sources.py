"""A new source family is its own module plus one registry line: a toy family, defined only here, stores
its keys and values fused (``self_attn.wkv``), its down projection renamed and one config field under its
own name, and refuses a field of its own. It converts to a layout (its function kept) and back into its
own form (``--to mha``, ``--to dha --uniform``), tensor for tensor what the LLaMA original gives."""

import json
from pathlib import Path

import pytest
import torch
from conftest import logits, read_json
from safetensors.torch import load_file, save_file

from rehead import families
from rehead.convert import convert
from rehead.describe import describe, format_text
from rehead.errors import ReheadError
from rehead.families import Llama
from rehead.families.llama import check_heads


class Toy(Llama):
    """KV fused as [k; v], the down projection as ``w2``, ``rms_norm_eps`` as ``norm_eps``."""

    model_type = "rehead_toy_source"
    title = "Toy"
    limits = "without toy_window"

    def check(self, config, where):
        if config.get("toy_window") is not None:
            raise ReheadError(f"{where}: toy_window={config['toy_window']} is not supported")
        super().check(config, where)

    def llama_values(self, config):
        values = super().llama_values(config)
        values["rms_norm_eps"] = values.pop("norm_eps")
        return values

    def stored(self, config):
        kv_rows = config["num_key_value_heads"] * (config.get("head_dim") or
                                                   config["hidden_size"] // config["num_attention_heads"])
        return {"self_attn.wkv.weight": [("self_attn.k_proj.weight", kv_rows), ("self_attn.v_proj.weight", kv_rows)],
                "mlp.w2.weight": [("mlp.down_proj.weight", config["intermediate_size"])]}


def toy_form(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaMA-form tensors in the toy's layout."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("self_attn.k_proj.weight"):
            out[name.replace("k_proj", "wkv")] = torch.cat([t, tensors[name.replace("k_proj", "v_proj")]])
        elif name.endswith("mlp.down_proj.weight"):
            out[name.replace("down_proj", "w2")] = t
        elif not name.endswith("self_attn.v_proj.weight"):
            out[name] = t
    return out


@pytest.fixture
def toy(tiny, tmp_path, monkeypatch):
    """(the LLaMA original, the same weights as a toy-family checkpoint), the family registered for this test."""
    monkeypatch.setitem(families.FAMILIES, Toy.model_type, None)
    families.register(Toy())  # the registry line
    src = tiny("gqa")
    folder = tmp_path / "toy-src"
    folder.mkdir()
    save_file(toy_form(load_file(src / "model.safetensors")), folder / "model.safetensors")
    config = read_json(src / "config.json")
    config.update(model_type=Toy.model_type, architectures=["ToyForCausalLM"], norm_eps=config.pop("rms_norm_eps"))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    return src, folder


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_a_toy_family_converts_to_a_layout_with_its_function(toy, tmp_path, calib_file):
    src, source = toy
    calib = dict(calib=str(calib_file), calib_tokens=256, calib_seq_len=128, check_identity=True)
    out = convert(source, tmp_path / "moh", to="moh", active_heads=6, shared_heads=1, **calib)
    config = read_json(out / "config.json")
    assert config["model_type"] == "rehead_moh" and config["rms_norm_eps"] == read_json(src / "config.json")[
        "rms_norm_eps"]
    names = set(load_file(out / "model.safetensors"))
    assert "model.layers.0.self_attn.k_proj.weight" in names and not any("wkv" in n or "w2" in n for n in names)
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


@pytest.mark.parametrize("options", [dict(to="mha"), dict(to="dha", kv_budget=0.5, uniform=True, fusion="mean")])
def test_an_output_in_the_toy_family_is_written_in_its_own_form(toy, tmp_path, options):
    src, source = toy
    expected = load_file(convert(src, tmp_path / "from-llama", **options) / "model.safetensors")
    out = convert(source, tmp_path / "from-toy", **options)
    config = read_json(out / "config.json")
    assert config["model_type"] == Toy.model_type and "norm_eps" in config and "rms_norm_eps" not in config
    got = load_file(out / "model.safetensors")
    assert set(got) == set(toy_form(expected))
    assert all(torch.equal(got[name], t) for name, t in toy_form(expected).items())


def test_a_toy_family_refuses_what_it_cannot_hold(toy, tmp_path):
    _, source = toy
    config = read_json(source / "config.json")
    (source / "config.json").write_text(json.dumps({**config, "toy_window": 8}))
    with pytest.raises(ReheadError, match="toy_window=8 is not supported"):
        convert(source, tmp_path / "out", to="mha")
    assert not (tmp_path / "out").exists()


def test_weights_that_the_config_does_not_describe_are_named(toy, tmp_path):
    _, source = toy
    config = read_json(source / "config.json")
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))  # w2 has 48 rows
    with pytest.raises(ReheadError, match="mlp.w2.weight has 48 rows, but config.json's .* give 40"):
        convert(source, tmp_path / "out", to="mha")


@pytest.mark.parametrize("change, message", [
    (dict(num_attention_heads=None), "num_attention_heads is None; it must be a positive integer"),
    (dict(num_attention_heads=6, num_key_value_heads=4), "6 query heads cannot be grouped over 4 KV heads"),
    (dict(hidden_size=50, num_attention_heads=6, num_key_value_heads=2), "hidden_size 50 is not a multiple of the 6"),
])
def test_the_head_counts_a_family_reads_are_validated(change, message):
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32, "num_hidden_layers": 2, **change}
    with pytest.raises(ReheadError, match=message):
        check_heads(config, "src")


def test_inspect_shows_a_toy_source_its_family_and_what_each_layout_would_cache(toy):
    _, source = toy
    info = describe(source)  # 6 heads, 2 KV heads, head_dim 8, 2 layers
    assert info["family"] == "Toy" and info["query_heads"] == 6 and info["key_heads_per_layer"] == [2, 2]
    per_head = 2 * 8 * 2  # one K or V head over 2 layers in bf16
    assert info["kv_cache_bytes_per_token_bf16"] == 4 * per_head
    would = {flags: row["kv_cache_bytes_per_token_bf16"] for flags, row in info["if_converted"].items()}
    assert would == {"--to mha": 12 * per_head, "--to moh": 4 * per_head, "--to dha --kv-budget 0.5": 2 * per_head,
                     "--to gda --ratio 3": 6 * per_head}
    assert "source family         Toy" in format_text(info)


def test_the_readme_lists_every_family():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, family in families.FAMILIES.items():
        assert f"| {family.title} (`{name}`) |" in readme, f"README's source table lacks {name}"
