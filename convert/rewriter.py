"""The Rewriter protocol: what a layout's conversion implements, and what the engine hands it.

A rewriter is a class. The engine (convert/engine.py) makes one per conversion and calls it in the
order below; a layer's decisions travel as values (a hook's result is the next hook's argument),
never as state the rewriter fills in as it goes: once made, its hooks may be called for any layer
in any order. Its own state is what ``__init__`` derives from the options and the source.

Class attributes:
    layout            the name ``--to`` takes
    Options           the layout's options: a pydantic model extending ConvertOptions, validated
                      there; its own fields are the layout's command-line flags
    source_layouts    rehead layouts it reads as a source (stock LLaMA-family checkpoints always)
    needs_calibration whether the conversion pass runs calibration text through the layers
    needs_planning    whether a planning pass over the source's activations comes first
    probe_sequences   > 0: before planning, the engine measures each layer's logit sensitivity on
                      this many calibration sequences (``LayerInput.sensitivity``)
The three ``needs``/``probe`` values may instead be set on the instance in ``__init__``, where they
depend on the options or the source.

Hooks, in the order the engine calls them (``rewrite_layer``, ``target_config`` and, for a rewriter
that calibrates, ``layer_module`` have no default):
    check_source(config, where)     classmethod: refuse a source this conversion cannot read
    __init__(options, source_config)  check the options against the source; raise ReheadError
                                    before anything is written
    needs_tensor(name)              without calibration: which layer tensors it reads (the rest
                                    are copied unread)
    outer_tensors(names, read) -> {name: tensor | None}
                                    the tensors outside the decoder layers (``read(name)`` gives
                                    the source's): a new tensor, or None for the source's unchanged
    source_module(index, tensors, llama, device)  the source's decoder layer, run on calibration text
    observe_layer(layer) -> O       planning pass: what the source layer measures
    allot(observations) -> [A]      once, after planning: what each layer is given; A arrives in
                                    that layer's input as ``layer.allotment``
    rewrite_layer(layer) -> Rewritten(tensors, plan)
                                    the layer in the target layout (names relative to the layer)
                                    and the layer's plan, a typed value of the layout's own
    layer_module(index, tensors, plan)  with calibration: the converted layer, whose outputs are
                                    the next layer's inputs
    target_config(plans) -> dict    the output's config.json, from every layer's plan
    summary(plans) -> dict          what the conversion decided, for rehead.json's ``plan``
    write_extras(folder, plans)     files of the layout's own in the output folder

A second rewriter of a layout (an output format such as ``--export deci``, or GDA's
``--grow-signal``, which reads a GDA checkpoint) is registered with ``register_variant`` and says
by ``chosen(options)`` which options it converts.

Examples: convert/mha.py (the smallest: no calibration), convert/moh.py (calibrates; a plan per
layer), convert/dha.py (plans across layers first), convert/gda_growth.py (a variant).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from rehead import families
from rehead.layouts.modeling_stack import SourceDecoderLayer

from .options import ConvertOptions


@dataclass
class Calibration:
    """One layer's calibration inputs (n_seq, seq_len, d_model) and the means to run a layer on them."""

    hidden: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    micro_batch: int = 4

    @torch.no_grad()
    def run(self, layer: nn.Module, hooks: dict | None = None) -> torch.Tensor:
        """Runs ``layer`` over every sequence; ``hooks`` maps submodules to forward hooks(module, args, output)."""
        handles = [module.register_forward_hook(hook) for module, hook in (hooks or {}).items()]
        try:
            outputs = []
            for start in range(0, len(self.hidden), self.micro_batch):
                batch = self.hidden[start : start + self.micro_batch]
                cos, sin = (t[: len(batch)] for t in self.position_embeddings)
                outputs.append(layer(batch, attention_mask=None, position_embeddings=(cos, sin)))
            return torch.cat(outputs)
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class LayerInput:
    """What a rewriter gets for layer ``index``: its tensors (names relative to the layer: all of them
    when calibrating, else those its ``needs_tensor`` asks for); when calibrating, the source layer ready
    to run and its calibration inputs; the layer's logit sensitivity when ``probe_sequences`` asked
    for it (planning pass); what ``allot`` gave the layer (conversion pass, after planning)."""

    index: int
    tensors: dict[str, torch.Tensor]
    source_layer: nn.Module | None = None
    calibration: Calibration | None = None
    sensitivity: torch.Tensor | None = None
    allotment: Any = None


class Rewritten(NamedTuple):
    """A converted layer: its tensors (a tensor it was given and returns as the same object is written
    as the source's bytes) and its plan, the layout's own record of what was decided for the layer."""

    tensors: dict[str, torch.Tensor]
    plan: Any = None


class Rewriter:
    """A layout's conversion (the module docstring lists what a subclass sets and overrides)."""

    layout = ""
    Options: type[ConvertOptions] = ConvertOptions
    source_layouts: tuple[str, ...] = ()
    needs_calibration = False
    needs_planning = False
    probe_sequences = 0

    @classmethod
    def check_source(cls, config: dict, where: str) -> None:
        """Refuses a source this conversion cannot read (by default: anything but a LLaMA-family checkpoint)."""
        families.check_source(config, where, cls.source_layouts)

    @classmethod
    def chosen(cls, options: ConvertOptions) -> bool:
        """For a variant (``register_variant``): whether it converts with these options."""
        return False

    def __init__(self, options: ConvertOptions, source_config: dict):
        """The base reads the source's shape: its LLaMA form and its query, KV and layer counts."""
        self.options = options
        self.source_config = source_config
        self.llama = families.llama_config(source_config)
        self.heads, self.layers = self.llama.num_attention_heads, self.llama.num_hidden_layers
        self.kv = self.llama.num_key_value_heads or self.heads

    def needs_tensor(self, name: str) -> bool:
        return name.startswith("self_attn.")

    def source_module(self, index: int, tensors: dict[str, torch.Tensor], llama_config, device: str) -> nn.Module:
        return build_layer(SourceDecoderLayer, llama_config, index, tensors, device)

    def outer_tensors(self, names: list[str], read) -> dict[str, torch.Tensor | None]:
        return dict.fromkeys(names)

    def observe_layer(self, layer: LayerInput) -> Any:
        return None

    def allot(self, observations: list) -> list:
        return [None] * len(observations)

    def rewrite_layer(self, layer: LayerInput) -> Rewritten:
        raise NotImplementedError(f"{type(self).__name__} must define rewrite_layer")

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor], plan) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} calibrates, so it must define layer_module")

    def target_config(self, plans: list) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define target_config")

    def summary(self, plans: list) -> dict:
        return {}

    def write_extras(self, folder: Path, plans: list) -> None:
        pass


def build_layer(layer_class: type, config, index: int, tensors: dict[str, torch.Tensor], device: str) -> nn.Module:
    """A decoder layer holding ``tensors`` in float32 on ``device``, built without initialising random
    weights first; a missing o_proj bias (Qwen2's LLaMA form) is zero."""
    with torch.device("meta"):
        module = layer_class(config, index)
    state = {name: t.to(device=device, dtype=torch.float32) for name, t in tensors.items()}
    state = families.with_o_proj_bias(state, config)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def llama_values(llama_config) -> dict:
    """The source's LLaMA form as keyword arguments for a layout's config class."""
    values = llama_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "dtype"):
        values.pop(key, None)
    return values


def head_statistics(layer: LayerInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per calibration token (rows): the attention input x, each query head's query norm, and each
    head's contribution energy ||W_o^i · head_i||² to the attention output."""
    attn = layer.source_layer.self_attn
    head_dim, inputs, norms, energies = attn.head_dim, [], [], []

    def on_query(module, args, output):
        inputs.append(args[0].flatten(0, 1))
        norms.append(output.flatten(0, 1).unflatten(-1, (-1, head_dim)).norm(dim=-1))

    def on_output(module, args, output):
        heads = args[0].flatten(0, 1).unflatten(-1, (-1, head_dim))  # (N, H, d)
        weight = module.weight.unflatten(1, (-1, head_dim))  # (D, H, d)
        energies.append(torch.stack([(heads[:, h] @ weight[:, h].T).pow(2).sum(-1) for h in range(heads.shape[1])], 1))

    layer.calibration.run(layer.source_layer, {attn.q_proj: on_query, attn.o_proj: on_output})
    return torch.cat(inputs), torch.cat(norms), torch.cat(energies)
