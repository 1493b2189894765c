"""The source families rehead converts, and their registry.

A family is an adapter onto the LLaMA form (rehead.families.llama): how its config and tensor names
map onto it, and what it refuses. It is one module, a subclass of ``Llama``, and one ``register`` line
below. The engine reads every source through ``reader`` (LLaMA-form names; fused tensors split on
read, lazily), and the writer writes an output in the source's own family (``--to mha``,
``--to dha --uniform``) back in that family's tensor layout (``write_back``).
"""

from pathlib import Path

from transformers import LlamaConfig

from rehead.checkpoint import CheckpointReader
from rehead.errors import ReheadError
from rehead.layouts import BY_MODEL_TYPE

from .fused import SplitReader, fuse_back
from .llama import Llama, with_o_proj_bias
from .mistral import Mistral
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3

FAMILIES: dict[str, Llama] = {}


def register(family: Llama) -> Llama:
    """Makes checkpoints of ``family.model_type`` a source of every conversion."""
    FAMILIES[family.model_type] = family
    return family


register(Llama())
register(Mistral())
register(Qwen2())
register(Phi3())
register(Qwen3())


def family_of(config: dict, where: str) -> Llama:
    """The family that reads ``config``; a rehead layout's config is a LlamaConfig with fields of its own."""
    model_type = config.get("model_type")
    if model_type in BY_MODEL_TYPE:
        return FAMILIES["llama"]
    if model_type not in FAMILIES:
        known = OTHER_LAYOUTS.get(model_type)
        raise ReheadError(
            f"{where}: model_type {model_type!r} is not supported"
            + (f" ({known}); convert from the original model" if known else "")
            + f"; rehead converts {', '.join(FAMILIES)} checkpoints"
        )
    return FAMILIES[model_type]


# attention layouts rehead writes as stock classes (so they carry no rehead model_type) and their peers
OTHER_LAYOUTS = {
    "deepseek_v3": "already multi-head latent attention: what rehead convert --to mla writes",
    "deepseek_v2": "already multi-head latent attention",
    "nemotron_nas": "a DeciLM with per-layer KV heads: what rehead convert --to dha --export deci writes",
    "deci": "a DeciLM with per-layer KV heads",
}


def check_source(config: dict, where: str, layouts: tuple[str, ...] = ()) -> None:
    """Refuses what rehead cannot convert; ``layouts``: the rehead layouts this conversion reads too."""
    layout = BY_MODEL_TYPE.get(config.get("model_type"))
    if layout is not None and layout.name in layouts:
        return  # the layout's own config validates it
    if layout is not None:
        raise ReheadError(f"{where}: already a rehead {layout.name} checkpoint; convert from the original model")
    family_of(config, where).check(config, where)


def llama_config(config: dict) -> LlamaConfig:
    """The source's configuration as a LlamaConfig computing the same function."""
    return LlamaConfig.from_dict(family_of(config, "config.json").llama_values(config))


def reader(config: dict, checkpoint: CheckpointReader) -> CheckpointReader | SplitReader:
    """The source's tensors under their LLaMA-form names."""
    stored = family_of(config, str(checkpoint.folder)).stored(config)
    return SplitReader(checkpoint, stored) if stored else checkpoint


def write_back(folder: Path, config: dict) -> None:
    """Weights written in the LLaMA form, rewritten in the family's own layout where ``config`` is the family's."""
    family = FAMILIES.get(config.get("model_type"))
    stored = family.stored(config) if family is not None else {}
    if stored:
        fuse_back(folder, stored)


__all__ = ["FAMILIES", "Llama", "check_source", "family_of", "llama_config", "reader", "register", "with_o_proj_bias",
           "write_back"]
