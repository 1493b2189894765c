"""Head-level views of attention weights, shared by the conversions.

A projection's weight is (heads·head_dim, in); head h owns rows h·d … (h+1)·d. o_proj's
weight is (out, heads·head_dim); head h owns the same columns.
"""

import re

import torch

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
KV_RE = re.compile(r"(^|\.)self_attn\.[kv]_proj\.")


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
