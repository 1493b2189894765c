"""The LLaMA form, which every conversion reads, and the llama family, which is stored in it.

LLaMA 1/2/3.x and SmolLM checkpoints are LLaMA blocks as they are. Every other source family is an
adapter onto this form (rehead.families): its config as LlamaConfig values, its tensors under
LLaMA's names (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, the two norms).
"""

import re

import torch
from transformers import LlamaConfig

from rehead.errors import ReheadError

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
KV_RE = re.compile(r"(^|\.)self_attn\.[kv]_proj\.")
# keys of a config.json that name its architecture or how it was stored, not what it computes
NOT_THE_FUNCTION = ("model_type", "architectures", "auto_map", "quantization_config")


class Llama:
    """A source family: how its config and tensors map onto the LLaMA form, and what it refuses.

    The llama family is the form itself. A family of its own subclasses this and overrides what
    differs: ``check`` (what it refuses, with the config fields it reads validated),
    ``llama_values`` (its config as LlamaConfig values), ``stored`` (tensors it stores otherwise,
    such as fused projections, which rehead.families.fused splits on read and fuses back on write).
    """

    model_type = "llama"
    title = "LLaMA 1/2/3.x, SmolLM"
    limits = ""  # what it refuses or changes, in a phrase (``rehead inspect --sources``, README)

    def check(self, config: dict, where: str) -> None:
        """Raises ReheadError for what the LLaMA form cannot hold."""
        check_heads(self.llama_values(config), where)

    def llama_values(self, config: dict) -> dict:
        """The config's values for LlamaConfig, computing the same function."""
        return {k: v for k, v in config.items() if k not in NOT_THE_FUNCTION}

    def stored(self, config: dict) -> dict[str, list[tuple[str, int]]]:
        """The layer tensors (names relative to the layer) this family stores otherwise than the LLaMA form:
        each maps to its LLaMA-form parts, (name, rows), concatenated along the rows in that order."""
        return {}


def check_heads(config: dict, where: str) -> None:
    """The head counts of a config in the LLaMA form: present, whole, and groupable."""
    for key in ("num_attention_heads", "num_hidden_layers", "hidden_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ReheadError(f"{where}: config.json's {key} is {config.get(key)!r}; it must be a positive integer")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise ReheadError(f"{where}: {heads} query heads cannot be grouped over {kv} KV heads")
    if not config.get("head_dim") and config["hidden_size"] % heads:
        raise ReheadError(f"{where}: hidden_size {config['hidden_size']} is not a multiple of the {heads} heads, and "
                          "config.json gives no head_dim; add the head_dim the checkpoint's projections have")


def with_o_proj_bias(tensors: dict[str, torch.Tensor], llama: LlamaConfig, prefix: str = "self_attn.") -> dict:
    """A layer's attention tensors in the LLaMA form: with attention_bias, LLaMA's o_proj has a bias too;
    a source that stores none (Qwen2) gets a zero one, which computes the same function."""
    name = prefix + "o_proj.bias"
    if not llama.attention_bias or name in tensors:
        return tensors
    like = tensors[prefix + "o_proj.weight"]
    return {**tensors, name: torch.zeros(llama.hidden_size, dtype=like.dtype, device=like.device)}


# Head-level views of the LLaMA form's attention weights. A projection's weight is (heads·head_dim, in);
# head h owns rows h·d … (h+1)·d. o_proj's weight is (out, heads·head_dim); head h owns the same columns.


def repeat_heads(weight: torch.Tensor, repeats: int, head_dim: int) -> torch.Tensor:
    """Repeats every head's rows ``repeats`` times in place order (KV head j -> heads j·r … j·r+r-1)."""
    heads = weight.shape[0] // head_dim
    blocks = weight.reshape(heads, head_dim, *weight.shape[1:])
    return blocks.repeat_interleave(repeats, dim=0).reshape(heads * repeats * head_dim, *weight.shape[1:])


def head_dim_of(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def repeat_kv_weights(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Turns grouped-query K/V projections into one K/V head per query head (the same function)."""
    repeats = config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = head_dim_of(config)
    return {
        name: repeat_heads(tensor, repeats, head_dim) if KV_RE.search(name) and repeats > 1 else tensor
        for name, tensor in tensors.items()
    }


def mha_config(config: dict) -> dict:
    return {**config, "num_key_value_heads": config["num_attention_heads"]}
