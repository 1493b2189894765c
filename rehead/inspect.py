"""``rehead inspect``: what a checkpoint's attention looks like, read from its config and shard headers."""

import json
import math
from pathlib import Path

from rehead.checkpoint import CheckpointReader, read_config
from rehead.heads import head_dim_of
from rehead.layouts import BY_MODEL_TYPE


def describe(folder: Path, allow_pickle: bool = False) -> dict:
    config = read_config(folder)
    model_type = config.get("model_type")
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = head_dim_of(config)
    k_heads = config.get("key_heads_per_layer") or [kv + config.get("gda_noise_heads", 0)] * layers
    v_heads = config.get("value_heads_per_layer") or [kv] * layers
    if "block_configs" in config:  # DeciLM: a KV head count per layer (none in a no-op or linear block)
        groups = [block["attention"].get("n_heads_in_group") for block in config["block_configs"]]
        k_heads = v_heads = [heads // group if group else 0 for group in groups]
    layout = BY_MODEL_TYPE[model_type].name if model_type in BY_MODEL_TYPE else _stock_layout(heads, kv)

    reader = CheckpointReader(folder, allow_pickle)
    shapes = reader.shapes()
    params = sum(math.prod(shape) for shape in shapes.values())
    info = {
        "path": str(folder),
        "architecture": (config.get("architectures") or [model_type])[0],
        "model_type": model_type,
        "layout": layout,
        "layers": layers,
        "query_heads": heads,
        "key_heads_per_layer": k_heads,
        "value_heads_per_layer": v_heads,
        "head_dim": head_dim,
        "hidden_size": config["hidden_size"],
        "parameters": params,
        "kv_cache_bytes_per_token_bf16": sum(k + v for k, v in zip(k_heads, v_heads)) * head_dim * 2,
        "options": _options(config, layout),
    }
    if layout == "gda":  # λ: how far training has moved each layer away from the source's attention
        lambdas = [reader.get(f"model.layers.{i}.self_attn.diff_lambda").float() for i in range(layers)]
        info["options"]["lambda_mean_abs"] = round(sum(x.abs().mean().item() for x in lambdas) / layers, 6)
        info["options"]["lambda_max_abs"] = round(max(x.abs().max().item() for x in lambdas), 6)
    provenance = folder / "rehead.json"
    if provenance.is_file():
        info["source"] = json.loads(provenance.read_text())["source"]["id"]
    return info


def _stock_layout(heads: int, kv: int) -> str:
    return "mha" if kv == heads else "mqa" if kv == 1 else "gqa"


def _options(config: dict, layout: str) -> dict:
    if layout == "moh":
        return {
            "active_heads": config["moh_active_heads"],
            "shared_heads_per_layer": config["moh_shared_heads"],
            "router": config["moh_router"],
            "active_fraction": round(config["moh_active_heads"] / config["num_attention_heads"], 4),
        }
    if layout == "gda":
        return {
            "signal_heads": config["num_attention_heads"],
            "noise_heads": config["gda_noise_heads"],
            "ratio": config["num_attention_heads"] // config["gda_noise_heads"],
            "subln": config.get("gda_subln", False),
        }
    if layout == "dha":
        return {"key_head_of_query": config["key_head_of_query"], "value_head_of_query": config["value_head_of_query"]}
    return {}


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
