"""The source architectures rehead reads, and their common LLaMA form.

LLaMA 1/2/3.x, SmolLM and Mistral (without sliding window) are LLaMA blocks; Qwen2 is a LLaMA
block with biases on q/k/v (and none on o_proj, which becomes a zero bias in the LLaMA form).
"""

import torch
from transformers import LlamaConfig

from rehead.errors import ReheadError
from rehead.layouts import BY_MODEL_TYPE

SOURCES = ("llama", "mistral", "qwen2")


def check_source(config: dict, where: str, layouts: tuple[str, ...] = ()) -> None:
    """Refuses what rehead cannot convert; ``layouts``: the rehead layouts this conversion reads too."""
    model_type = config.get("model_type")
    if model_type in BY_MODEL_TYPE and BY_MODEL_TYPE[model_type].name in layouts:
        return  # the layout's own config validates it
    if model_type in BY_MODEL_TYPE:
        raise ReheadError(
            f"{where}: already a rehead {BY_MODEL_TYPE[model_type].name} checkpoint; convert from the original model"
        )
    if model_type not in SOURCES:
        raise ReheadError(
            f"{where}: model_type {model_type!r} is not supported; rehead converts {', '.join(SOURCES)} checkpoints"
        )
    if model_type == "mistral" and config.get("sliding_window") is not None:
        raise ReheadError(
            f"{where}: Mistral with sliding_window={config['sliding_window']} is not supported "
            "(the converted layouts attend to the full context); use a checkpoint without a sliding window"
        )
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ReheadError(f"{where}: Qwen2 with use_sliding_window=true is not supported")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads") or config.get("num_attention_heads")
    if not heads or heads % kv:
        raise ReheadError(f"{where}: {heads} query heads cannot be grouped over {kv} KV heads")


def llama_config(config: dict) -> LlamaConfig:
    """The source's configuration as a LlamaConfig computing the same function."""
    values = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    values.pop("quantization_config", None)
    if config["model_type"] == "qwen2":
        values["attention_bias"] = True
        for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
            values.pop(key, None)
    if config["model_type"] == "mistral":
        values.pop("sliding_window", None)
    return LlamaConfig.from_dict(values)


def with_o_proj_bias(tensors: dict[str, torch.Tensor], llama: LlamaConfig, prefix: str = "self_attn.") -> dict:
    """A layer's attention tensors in the LLaMA form: with attention_bias, LLaMA's o_proj has a bias too;
    a source that stores none (Qwen2) gets a zero one, which computes the same function."""
    name = prefix + "o_proj.bias"
    if not llama.attention_bias or name in tensors:
        return tensors
    like = tensors[prefix + "o_proj.weight"]
    return {**tensors, name: torch.zeros(llama.hidden_size, dtype=like.dtype, device=like.device)}
