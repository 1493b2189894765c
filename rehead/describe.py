"""``rehead inspect``: what a checkpoint's attention looks like, read from its config and shard headers."""

import math
from pathlib import Path

from rehead import families
from rehead.checkpoint import CheckpointReader, read_config
from rehead.families.llama import head_dim_of
from rehead.layouts import BY_MODEL_TYPE, layout_config
from rehead.provenance import Provenance


def describe(folder: Path, allow_pickle: bool = False) -> dict:
    config = read_config(folder)
    model_type = config.get("model_type")
    family = families.FAMILIES.get(model_type)
    shape = family.llama_values(config) if family else config  # a family's head counts, in the LLaMA form
    heads = shape["num_attention_heads"]
    layers = shape["num_hidden_layers"]
    kv = shape.get("num_key_value_heads") or heads
    head_dim = head_dim_of(shape)
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
        "hidden_size": shape["hidden_size"],
        "parameters": params,
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes(k_heads, v_heads, head_dim),
        "options": layout.layout_facts(reader.get) if layout else {},
    }
    info.update(latent_cache(config))
    record = Provenance.load(folder)
    if record is not None and record.source is not None:
        info["source"] = record.source.id
    elif family is not None:
        info["family"] = family.title
        info["if_converted"] = if_converted(heads, kv, layers, head_dim)
    return info


def latent_cache(config: dict) -> dict:
    """Multi-head latent attention (a DeepSeek config, as ``--to mla`` writes it): each token caches, per
    layer, one latent of kv_lora_rank values and one RoPE key of qk_rope_head_dim values that every head
    reads, whatever the head counts; an empty dict for any other attention."""
    rank, rope = config.get("kv_lora_rank"), config.get("qk_rope_head_dim")
    if not isinstance(rank, int) or not isinstance(rope, int):
        return {}
    nope = config.get("qk_nope_head_dim") or 0  # a DeepSeek config's own head_dim is its RoPE dims
    return {"layout": "mla", "key_heads_per_layer": None, "value_heads_per_layer": None, "head_dim": nope + rope,
            "kv_cache_bytes_per_token_bf16": 2 * config["num_hidden_layers"] * (rank + rope),
            "options": {"kv_lora_rank": rank, "qk_rope_head_dim": rope,
                        "qk_nope_head_dim": config.get("qk_nope_head_dim"), "v_head_dim": config.get("v_head_dim")}}


def if_converted(heads: int, kv: int, layers: int, head_dim: int) -> dict[str, dict]:
    """What each layout's conversion of a source with these heads would cache per token (bf16), at typical
    settings, and what it buys."""
    per_head = layers * head_dim * 2  # one cached K or V head, every layer, bf16
    source = 2 * kv * per_head
    group = heads // kv if kv < heads else min((g for g in range(2, heads + 1) if heads % g == 0), default=1)

    def row(bytes_: int, what: str) -> dict:
        return {"kv_cache_bytes_per_token_bf16": bytes_, "of_source": round(bytes_ / source, 4), "what": what}

    rows = {
        "--to mha": row(2 * heads * per_head, "one KV head per query head, the same function"),
        "--to moh": row(source, "the same KV cache; each token computes only its active heads (3/4 at the default)"),
    }
    for budget in sorted({0.5, 1 / kv} - {1.0}, reverse=True):  # DHA keeps at least one KV head per layer
        if budget >= 1 / kv:
            rows[f"--to dha --kv-budget {budget:.4g}"] = row(2 * round(budget * layers * kv) * head_dim * 2,
                                                             "K and V heads fused per layer, where it costs least")
    if kv == 1:
        rows["--to dha"] = row(source, "one KV head per layer already: nothing to fuse")
    rows[f"--to gda --ratio {group}"] = row(source + heads // group * per_head,
                                            f"a noise key per {group} signal heads: it buys accuracy, not memory")
    return rows


def kv_cache_bytes(key_heads: list[int], value_heads: list[int], head_dim: int) -> int:
    """KV-cache bytes per token in bf16: 2 bytes × head_dim × (key heads + value heads), summed over the layers."""
    return 2 * head_dim * (sum(key_heads) + sum(value_heads))


def _stock_layout(heads: int, kv: int) -> str:
    return "mha" if kv == heads else "mqa" if kv == 1 else "gqa"


def format_text(info: dict) -> str:
    def runs(values: list[int] | None) -> str:
        if values is None:  # MLA: no K/V heads are cached
            return "none: one latent and one RoPE key that every head reads"
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
    if "family" in info:
        lines.append(f"{'source family':<22}{info['family']}")
    for key, value in info["options"].items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            value = " | ".join(",".join(map(str, v)) for v in value)
        lines.append(f"{key.replace('_', ' '):<22}{value}")
    if "if_converted" in info:
        lines.append("if converted (KV cache / token, bf16):")
        width = max(map(len, info["if_converted"]))
        for flags, row in info["if_converted"].items():
            lines.append(f"  {flags:<{width}}  {row['kv_cache_bytes_per_token_bf16']:>10,} bytes  "
                         f"×{row['of_source']:<6g} {row['what']}")
    return "\n".join(lines)
