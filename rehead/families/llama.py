"""The LLaMA form, which every conversion reads, and the llama family, which is stored in it.

LLaMA 1/2/3.x and SmolLM checkpoints are LLaMA blocks as they are. Every other source family is an
adapter onto this form (rehead.families): its config as LlamaConfig values, its tensors under
LLaMA's names (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, the two norms).
"""

import torch
from transformers import LlamaConfig

from rehead.errors import ReheadError

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
