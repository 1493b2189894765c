"""``--to gda --grow-signal N``: group-differentiated growth (the GDA paper's scaling) of a GDA checkpoint.

The source is a GDA checkpoint (``--to gda``'s output). Each noise-control group gains N signal
heads, copies of its own signal heads, and nothing else: noise heads, KV heads and λ_init stay. A
copy takes its original's query rows (and λ_i) and reads the same KV head and noise head, so it
computes the same head output; the original's o_proj columns are shared between them in uneven
parts (2/3 and 1/3 for a pair) that sum to the original: the grown model computes the source's
function (up to float rounding: the parts are rounded to the checkpoint's dtype, which in bf16
moves the copied columns by up to 2⁻⁸ of their size). Even halves would be exact, but copies with
equal columns receive equal gradients and stay identical under any optimiser; uneven parts let
them diverge from the second step.
"""

from dataclasses import dataclass

import torch

from rehead.errors import ReheadError
from rehead.layouts.configuration_gda import GDAConfig
from rehead.layouts.modeling_gda import GDADecoderLayer

from .gda import GDAConversion, GDAOptions
from .options import flag
from .rewriter import LayerInput, Rewritten, build_layer, llama_values


def growth_step(heads: int, kv: int, noise: int) -> int:
    """The --grow-signal values must be multiples of this: the KV heads one noise group spans, since
    every KV head keeps as many readers as the others."""
    ratio, group = heads // noise, heads // kv
    return ratio // min(ratio, group)


def uneven_shares(count: int) -> list[float]:
    """Parts of one head's o_proj columns for its ``count`` instances: count, count − 1, …, 1, normalised."""
    return [2 * (count - j) / (count * (count + 1)) for j in range(count)]


def grow_signal_heads(heads: int, kv: int, noise: int, added: int) -> tuple[list[int], list[float]]:
    """For each signal head of the grown layer, the source head it copies and its share of that head's
    o_proj columns.

    A unit is the contiguous heads of one noise group that read one KV head (min(ratio, group) of
    them); each unit gains ``added / growth_step`` heads, copies of its own heads in turn, placed
    beside their originals. Every head thus still reads its original's KV head and noise head, and
    the KV groups and noise groups stay contiguous and aligned.
    """
    ratio, group = heads // noise, heads // kv
    size = min(ratio, group)
    grown = size + added // growth_step(heads, kv, noise)
    source, share = [], []
    for start in range(0, heads, size):
        for j in range(size):
            count = grown // size + (j < grown % size)
            source += [start + j] * count
            share += uneven_shares(count)
    return source, share


@dataclass(frozen=True)
class Growth:
    """Where every signal head of a grown layer comes from (the same in every layer)."""

    copy_of: list[int]  # the source head each grown head copies
    share: list[float]  # its share of that head's o_proj columns


class GDAGrowthRewriter(GDAConversion):
    """Grows a GDA checkpoint's signal heads (``--grow-signal``); its source is a GDA checkpoint."""

    source_layouts = ("gda",)

    @classmethod
    def chosen(cls, options: GDAOptions) -> bool:
        return options.grow_signal is not None

    def __init__(self, options: GDAOptions, source_config: dict):
        if source_config.get("model_type") != GDAConfig.model_type:
            raise ReheadError(
                f"--grow-signal {options.grow_signal} grows a GDA checkpoint; this source is a stock "
                f"{source_config.get('model_type')} one: convert it with --to gda --ratio G first, then grow that"
            )
        super().__init__(options, source_config)
        given = options.model_fields_set & {"ratio", "mode", "subln", "lambda_"}
        if given:
            flags = ", ".join(flag(name) for name in sorted(given))
            raise ReheadError(f"--grow-signal keeps the source's noise heads, λ and sub-norm: drop {flags}")
        self.source = GDAConfig.from_dict({k: v for k, v in source_config.items() if k != "auto_map"})
        self.source._attn_implementation = "sdpa"
        heads, kv, noise = self.source.num_attention_heads, self.source.num_key_value_heads, self.source.gda_noise_heads
        step, added = growth_step(heads, kv, noise), options.grow_signal
        if added < 1 or added % step:
            why = "must be at least 1" if added < 1 else (
                f"each noise group of {heads // noise} signal heads spans {step} KV heads, and copies read their "
                "original's KV head, which must keep as many readers as the others")
            fits = ", ".join(str(step * m) for m in range(1, 4))
            raise ReheadError(f"--grow-signal {added}: {why}; values that fit: multiples of {step} ({fits}, …)")
        self.head_dim = self.source.head_dim
        self.heads = heads
        self.growth = Growth(*grow_signal_heads(heads, kv, noise, added))
        self.output = GDAConfig(**{**llama_values(self.source), "num_attention_heads": len(self.growth.copy_of)})
        self.output._attn_implementation = "sdpa"

    def source_module(self, index: int, tensors: dict[str, torch.Tensor], llama_config, device: str):
        return build_layer(GDADecoderLayer, self.source, index, tensors, device)

    def rewrite_layer(self, layer: LayerInput) -> Rewritten:
        """Copies of signal heads: their q_proj rows (and λ_i), and shares of their o_proj columns."""
        t = dict(layer.tensors)
        copy_of = torch.tensor(self.growth.copy_of)
        for part in ("weight", "bias"):
            name = f"self_attn.q_proj.{part}"
            if name in t:
                t[name] = t[name].unflatten(0, (self.heads, self.head_dim))[copy_of].flatten(0, 1)
        o = t["self_attn.o_proj.weight"].unflatten(1, (self.heads, self.head_dim))
        share = torch.tensor(self.growth.share, dtype=torch.float64)[None, :, None]
        t["self_attn.o_proj.weight"] = (o[:, copy_of].double() * share).to(o.dtype).flatten(1)
        if "self_attn.diff_lambda" in t:  # --lambda plain: one λ per head; diff's per-layer λ stays as it is
            t["self_attn.diff_lambda"] = t["self_attn.diff_lambda"][copy_of]
        return Rewritten(t, self.growth)

    def summary(self, plans: list[Growth]) -> dict:
        return {
            "mode": "grow-signal",
            "added_per_noise_group": self.options.grow_signal,
            "source_signal_heads": self.heads,
            "signal_heads": len(self.growth.copy_of),
            "noise_heads": self.source.gda_noise_heads,
            "kv_heads": self.source.num_key_value_heads,
            "copy_of": self.growth.copy_of,
            "o_proj_share": [round(s, 6) for s in self.growth.share],
        }
