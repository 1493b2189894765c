"""A new layout is its own files plus one registry line: a toy layout, defined only here, is registered
and converted end to end (Python API and command line), inspected, and loaded without rehead."""

import importlib
import sys
import textwrap
from typing import Literal

import pytest
import torch
from conftest import load_without_rehead, logits, read_json

from rehead import convert as convert_stage
from rehead import layouts
from rehead.app.cli import main
from rehead.convert import ConvertOptions, convert
from rehead.convert.rewriter import LayerInput, Rewriter, Rewritten, build_layer, llama_values
from rehead.describe import describe

CONFIGURATION = '''
from transformers import LlamaConfig


class ToyConfig(LlamaConfig):
    """LLaMA with a learnable gain on every head's output."""

    model_type = "rehead_toy"
    layout_summary = "toy attention: every head's output has a gain"

    def kv_heads_per_layer(self):
        return [self.num_key_value_heads] * self.num_hidden_layers, [self.num_key_value_heads] * self.num_hidden_layers

    def layout_facts(self, read=None):
        return {"gain_of_layer_0": read("model.layers.0.self_attn.head_gain").tolist() if read else None}

    def card_lines(self):
        return ["- every head has a gain"]
'''

MODELING = '''
import torch
from torch import nn
from transformers import GenerationMixin
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from .configuration_toy import ToyConfig


class ToyAttention(LlamaAttention):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.head_gain = nn.Parameter(torch.ones(config.num_attention_heads))
        self.o_proj.register_forward_pre_hook(self._gain)

    def _gain(self, module, args):
        return (args[0] * self.head_gain.repeat_interleave(self.head_dim).to(args[0].dtype),)


class ToyDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.self_attn = ToyAttention(config, layer_idx)


class ToyForCausalLM(LlamaForCausalLM, GenerationMixin):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.layers = nn.ModuleList([ToyDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy layout's files written as a package, imported, and registered (for this test only)."""
    package = tmp_path / "toy_layout"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "configuration_toy.py").write_text(textwrap.dedent(CONFIGURATION))
    (package / "modeling_toy.py").write_text(textwrap.dedent(MODELING))
    monkeypatch.syspath_prepend(str(tmp_path))
    configuration = importlib.import_module("toy_layout.configuration_toy")
    modeling = importlib.import_module("toy_layout.modeling_toy")

    class ToyOptions(ConvertOptions):
        to: Literal["toy"] = "toy"
        gain: float = 1.0

    class ToyRewriter(Rewriter):
        layout = "toy"
        Options = ToyOptions

        def __init__(self, options, source_config):
            super().__init__(options, source_config)
            self.config = configuration.ToyConfig(**llama_values(self.llama))
            self.config._attn_implementation = "sdpa"

        def rewrite_layer(self, layer: LayerInput):
            heads = self.config.num_attention_heads
            return Rewritten({**layer.tensors, "self_attn.head_gain": torch.full((heads,), self.options.gain)})

        def layer_module(self, index, tensors, plan):
            return build_layer(modeling.ToyDecoderLayer, self.config, index, tensors, "cpu")

        def target_config(self, plans):
            return self.config.to_dict()

    # registered for this test only: monkeypatch removes the entries afterwards
    monkeypatch.setitem(layouts.LAYOUTS, "toy", None)
    monkeypatch.setitem(layouts.BY_MODEL_TYPE, "rehead_toy", None)
    monkeypatch.setitem(convert_stage.CONVERTERS, "toy", None)
    layouts.register("toy", configuration.ToyConfig, modeling.ToyForCausalLM)  # the registry lines
    convert_stage.register(ToyRewriter)
    yield
    for name in [m for m in sys.modules if m.startswith("toy_layout")]:
        del sys.modules[name]


IDS = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


def test_a_toy_layout_converts_end_to_end(toy, tiny, tmp_path, capsys):
    src = tiny("gqa")
    out = convert(src, tmp_path / "toy", to="toy")  # gain 1: the source's function
    config = read_json(out / "config.json")
    assert config["model_type"] == "rehead_toy" and config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_toy.ToyForCausalLM"
    assert (out / "configuration_toy.py").is_file() and (out / "modeling_toy.py").is_file()
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5
    assert read_json(out / "rehead.json")["layout"] == "toy"
    assert describe(out)["options"] == {"gain_of_layer_0": [1.0] * 6}

    # the command line has the layout's flag, from its options model
    assert main(["convert", str(src), str(tmp_path / "toy2"), "--to", "toy", "--gain", "0.5"]) == 0
    assert "gain of layer 0       [0.5, 0.5" in capsys.readouterr().out  # convert prints the inspect summary
    halved = logits(tmp_path / "toy2", IDS)
    assert (halved - logits(src, IDS)).abs().max() > 1e-3
    remote = load_without_rehead(tmp_path / "toy2", IDS.tolist(), tmp_path)
    assert remote["class"] == "ToyForCausalLM"
    assert torch.allclose(torch.tensor(remote["logits"]), halved[0, -1], atol=1e-5)
