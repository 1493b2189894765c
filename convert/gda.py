"""``--to gda``: grouped differential attention from a trained checkpoint.

``grow`` keeps every source head as a signal head and adds one noise-control head per G signal
heads, its query and key the mean of its group's (λ = 0: exactly the source's function).
``repurpose`` turns the least important head of each G + 1 (the one contributing least to the
attention output on calibration text) into its group's noise head: its query becomes the
noise query and its KV head's key the noise key, so the noise map starts as that head's own
attention map; the head count stays the same.

λ is one parameter per signal head starting at 0 (``--lambda plain``), or the DIFF Transformer's
per-layer λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init (``--lambda diff``), started with
λ_q2 = λ_q1 and λ_k2 = λ_k1 so that λ = λ_init exactly while every factor has a gradient. λ_init
is 0 (the identity) unless ``--subln`` asks for DIFF's sub-norm, whose (1 − λ_init) scale uses
DIFF's depth schedule λ_init(l) = 0.8 − 0.6·exp(−0.3·(l − 1)); with both options the start is
DIFF's own (λ = λ_init).

``--grow-signal`` grows a GDA checkpoint instead: convert/gda_growth.py.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from rehead import families
from rehead.errors import ReheadError
from rehead.layouts.configuration_gda import GDAConfig, diff_lambda_init
from rehead.layouts.modeling_gda import GDADecoderLayer

from .options import ConvertOptions
from .rewriter import LayerInput, Rewriter, Rewritten, build_layer, head_statistics, llama_values

DIFF_LAMBDA_STD = 0.1  # the DIFF Transformer's initialisation of λ_q1, λ_k1, λ_q2, λ_k2


class GDAOptions(ConvertOptions):
    to: Literal["gda"] = "gda"
    ratio: int | None = Field(None, description="one noise-control head per G signal heads, aligned with the KV "
                                                "groups (the error lists the values that fit)")
    mode: Literal["grow", "repurpose"] = Field(
        "grow", description="grow: add the noise heads (exactly the source at λ = 0); repurpose: turn the least "
                            "important head of each G + 1 into its group's noise head")
    subln: bool = Field(False, description="the DIFF Transformer's per-head RMSNorm and (1 - λ_init(l)) scale with "
                                           "its depth schedule (changes the function)")
    lambda_: Literal["plain", "diff"] = Field(
        "plain", alias="lambda", description="plain: one λ per signal head, from 0; diff: DIFF's per-layer "
                                             "λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, started at λ = λ_init")
    grow_signal: int | None = Field(None, description="grow a GDA checkpoint: N signal heads added per "
                                                      "noise-control group, the same function")

    @model_validator(mode="after")
    def _consistent(self):
        if self.check_identity and self.subln:
            raise ReheadError("--subln adds a per-head RMSNorm, which changes the function: it cannot pass "
                              "--check-identity; drop one of them")
        if self.check_identity and self.mode == "repurpose":
            raise ReheadError("--mode repurpose changes the function (a head becomes a noise head): "
                              "--check-identity holds only for --mode grow")
        return self


def aligned(size: int, group: int) -> bool:
    """A group of ``size`` consecutive heads lies inside one KV group, or is a whole number of them."""
    return group % size == 0 or size % group == 0


def diff_lambda_factors(layer: int, head_dim: int) -> dict[str, torch.Tensor]:
    """λ_q1, λ_k1 ~ N(0, 0.1²), seeded by the layer (the same every run), and λ_q2 = λ_q1, λ_k2 = λ_k1:
    λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init = λ_init exactly, and ∂λ/∂λ_q1 = exp(λ_q1·λ_k1)·λ_k1 ≠ 0."""
    generator = torch.Generator().manual_seed(layer)
    q, k = (DIFF_LAMBDA_STD * torch.randn(head_dim, generator=generator) for _ in range(2))
    return {"lambda_q1": q, "lambda_k1": k, "lambda_q2": q.clone(), "lambda_k2": k.clone()}


@dataclass
class GDALayerPlan:
    repurposed: list[int] | None  # --mode repurpose: the source heads that became the layer's noise heads


class GDAConversion(Rewriter):
    """What the GDA rewriters share: their output has one GDAConfig, ``self.output``, which a
    subclass's ``__init__`` sets."""

    layout = "gda"
    Options = GDAOptions
    output: GDAConfig

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor], plan):
        return build_layer(GDADecoderLayer, self.output, index, tensors, self.options.device)

    def target_config(self, plans: list) -> dict:
        return self.output.to_dict()


class GDARewriter(GDAConversion):
    """Grouped differential attention from a stock checkpoint (``--mode grow`` or ``repurpose``)."""

    @classmethod
    def check_source(cls, config: dict, where: str) -> None:
        if config.get("model_type") == GDAConfig.model_type:
            raise ReheadError("this source is already a GDA checkpoint: grow its signal heads with --grow-signal N, "
                              "or convert from the original model")
        super().check_source(config, where)

    def __init__(self, options: GDAOptions, source_config: dict):
        super().__init__(options, source_config)
        o = self.options
        if o.ratio is None:
            raise ReheadError("--to gda needs --ratio G: one noise-control head per G signal heads")
        self.head_dim = self.llama.head_dim
        group = self.heads // self.kv
        extra = 1 if o.mode == "repurpose" else 0  # repurpose: G + 1 source heads become G signal + 1 noise

        def fits(g: int) -> bool:
            if self.heads % (g + extra):
                return False
            if extra:  # every KV head must keep the same number of readers: groups inside KV groups, or MHA
                return group % (g + extra) == 0 or group == 1
            return aligned(g, group)

        valid = [g for g in range(1, self.heads + 1 - extra) if fits(g)]
        if o.ratio < 1 or o.ratio + extra > self.heads or not fits(o.ratio):
            why = "must be at least 1" if o.ratio < 1 else (
                f"larger than the {self.heads} heads" if o.ratio + extra > self.heads else
                f"groups of {o.ratio + extra} heads do not tile {self.heads} heads in KV groups of {group}")
            raise ReheadError(f"--ratio {o.ratio}: {why}; values that fit ({o.mode}): {', '.join(map(str, valid))}")
        self.size = o.ratio + extra
        self.noise_heads = self.heads // self.size
        self.signal_heads = self.heads - extra * self.noise_heads
        self.reads = [i // group for i in range(self.heads)]
        # repurposing in MHA leaves each noise head's own KV head without a reader: it goes
        self.kv_out = self.kv - self.noise_heads if extra and group == 1 else self.kv
        layers = self.llama.num_hidden_layers
        self.lambda_init = [diff_lambda_init(layer + 1) for layer in range(layers)] if o.subln else [0.0] * layers
        self.needs_calibration = o.mode == "repurpose"
        values = llama_values(self.llama)
        values.update(num_attention_heads=self.signal_heads, num_key_value_heads=self.kv_out, head_dim=self.head_dim)
        self.output = GDAConfig(**values, gda_noise_heads=self.noise_heads, gda_subln=o.subln, gda_lambda=o.lambda_,
                                gda_lambda_init=self.lambda_init)
        self.output._attn_implementation = "sdpa"

    def heads_of(self, t: dict[str, torch.Tensor], projection: str, part: str) -> torch.Tensor:
        """A source projection's weight or bias, one row block per head."""
        count = self.heads if projection == "q_proj" else self.kv
        return t[f"self_attn.{projection}.{part}"].unflatten(0, (count, self.head_dim))

    def parts(self) -> list[str]:
        return ["weight"] + (["bias"] if self.llama.attention_bias else [])

    def grown_noise(self, t: dict[str, torch.Tensor], groups: list[list[int]]) -> dict[str, torch.Tensor]:
        """``--mode grow``: each noise head's query and key are the means of its group's."""
        noise = {}
        for part in self.parts():
            q, k = self.heads_of(t, "q_proj", part), self.heads_of(t, "k_proj", part)
            noise[f"q_proj.{part}"] = torch.stack([q[g].mean(0) for g in groups]).flatten(0, 1)
            noise[f"k_proj.{part}"] = torch.stack([k[sorted({self.reads[i] for i in g})].mean(0)
                                                   for g in groups]).flatten(0, 1)
        return noise

    def repurposed_noise(self, t: dict[str, torch.Tensor], victims: list[int]) -> dict[str, torch.Tensor]:
        """``--mode repurpose``: the ``victims`` become the noise heads; ``t`` keeps only the signal heads."""
        signal = [i for i in range(self.heads) if i not in victims]
        kept_kv = sorted({self.reads[i] for i in signal})
        noise = {}
        for part in self.parts():
            q, k = self.heads_of(t, "q_proj", part), self.heads_of(t, "k_proj", part)
            noise[f"q_proj.{part}"] = q[victims].flatten(0, 1)
            noise[f"k_proj.{part}"] = k[[self.reads[i] for i in victims]].flatten(0, 1)
        for name in ("q_proj", "k_proj", "v_proj"):
            keep = signal if name == "q_proj" else kept_kv
            for part in self.parts():
                t[f"self_attn.{name}.{part}"] = self.heads_of(t, name, part)[keep].flatten(0, 1)
        o = t["self_attn.o_proj.weight"].unflatten(1, (self.heads, self.head_dim))
        t["self_attn.o_proj.weight"] = o[:, signal].flatten(1)
        return noise

    def rewrite_layer(self, layer: LayerInput) -> Rewritten:
        t = families.with_o_proj_bias(dict(layer.tensors), self.llama)
        groups = [list(range(n * self.size, (n + 1) * self.size)) for n in range(self.noise_heads)]
        victims = None
        if self.options.mode == "repurpose":  # the least important head of each group
            importance = head_statistics(layer)[2].mean(0)
            victims = [min(g, key=lambda i: importance[i].item()) for g in groups]
        noise = self.grown_noise(t, groups) if victims is None else self.repurposed_noise(t, victims)
        t.update({f"self_attn.noise.{name}": w for name, w in noise.items()})
        for norm in ("q_norm", "k_norm"):  # a source's per-head q/k norms (Qwen3): the noise heads get the same
            if f"self_attn.{norm}.weight" in t:
                t[f"self_attn.noise.{norm}.weight"] = t[f"self_attn.{norm}.weight"].clone()
        if self.options.lambda_ == "diff":
            t.update({f"self_attn.{name}": w for name, w in diff_lambda_factors(layer.index, self.head_dim).items()})
        else:
            t["self_attn.diff_lambda"] = torch.zeros(self.signal_heads)
        if self.options.subln:
            t["self_attn.subln.weight"] = torch.ones(self.head_dim)
        return Rewritten(t, GDALayerPlan(victims))

    def summary(self, plans: list[GDALayerPlan]) -> dict:
        return {
            "mode": self.options.mode,
            "ratio": self.options.ratio,
            "signal_heads": self.signal_heads,
            "noise_heads": self.noise_heads,
            "kv_heads": self.kv_out,
            "subln": self.options.subln,
            "lambda": self.options.lambda_,
            "lambda_init_per_layer": [round(x, 6) for x in self.lambda_init],
            "repurposed_heads_per_layer": [plan.repurposed for plan in plans] if self.options.mode == "repurpose"
            else None,
        }
