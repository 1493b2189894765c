"""``rehead inspect``: what a checkpoint's attention looks like, read from its config and shard headers."""

import math
from pathlib import Path

from rehead.checkpoint import CheckpointReader, read_config
from rehead.heads import head_dim_of
from rehead.layouts import BY_MODEL_TYPE, layout_config
from rehead.provenance import Provenance


def describe(folder: Path, allow_pickle: bool = False) -> dict:
    config = read_config(folder)
    model_type = config.get("model_type")
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = head_dim_of(config)
    layout = layout_config(config)
    k_heads, v_heads = layout.kv_heads_per_layer() if layout else ([kv] * layers, [kv] * layers)
    reader = CheckpointReader(folder, allow_pickle)
    params = sum(math.prod(shape) for shape in reader.shapes().values())
    info = {
        "path": str(folder),
        "architecture": (config.get("architectures") or [model_type])[0],
        "model_type": model_type,
        "layout": BY_MODEL_TYPE[model_type].name if layout else _stock_layout(heads, kv),
        "layers": layers,
        "query_heads": heads,
        "key_heads_per_layer": k_heads,
        "value_heads_per_layer": v_heads,
        "head_dim": head_dim,
        "hidden_size": config["hidden_size"],
        "parameters": params,
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes(k_heads, v_heads, head_dim),
        "options": layout.layout_facts(reader.get) if layout else {},
    }
    record = Provenance.load(folder)
    if record is not None and record.source is not None:
        info["source"] = record.source.id
    return info


def kv_cache_bytes(key_heads: list[int], value_heads: list[int], head_dim: int) -> int:
    """KV-cache bytes per token in bf16: 2 bytes × head_dim × (key heads + value heads), summed over the layers."""
    return 2 * head_dim * (sum(key_heads) + sum(value_heads))


def _stock_layout(heads: int, kv: int) -> str:
    return "mha" if kv == heads else "mqa" if kv == 1 else "gqa"


def format_text(info: dict) -> str:
    def runs(values: list[int]) -> str:
        return str(values[0]) if len(set(values)) == 1 else " ".join(map(str, values))

    lines = [
        f"{'path':<22}{info['path']}",
        f"{'architecture':<22}{info['architecture']} ({info['model_type']})",
        f"{'layout':<22}{info['layout']}",
        f"{'layers':<22}{info['layers']}",
        f"{'query heads':<22}{info['query_heads']}",
        f"{'key heads / layer':<22}{runs(info['key_heads_per_layer'])}",
        f"{'value heads / layer':<22}{runs(info['value_heads_per_layer'])}",
        f"{'head_dim':<22}{info['head_dim']}",
        f"{'parameters':<22}{info['parameters']:,}",
        f"{'KV cache / token':<22}{info['kv_cache_bytes_per_token_bf16']:,} bytes (bf16)",
    ]
    if "source" in info:
        lines.append(f"{'converted from':<22}{info['source']}")
    for key, value in info["options"].items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            value = " | ".join(",".join(map(str, v)) for v in value)
        lines.append(f"{key.replace('_', ' '):<22}{value}")
    return "\n".join(lines)
