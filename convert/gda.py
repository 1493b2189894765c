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

Group-differentiated growth (``--grow-signal N``, the GDA paper's scaling): a GDA checkpoint
gains N signal heads per noise-control group, copies of its own signal heads, and nothing else:
noise heads, KV heads and λ_init stay. A copy takes its original's query rows (and λ_i) and
reads the same KV head and noise head, so it computes the same head output; the original's
o_proj columns are shared between them in uneven parts (2/3 and 1/3 for a pair) that sum to the
original: the grown model computes the source's function (up to float rounding: the parts are
rounded to the checkpoint's dtype, which in bf16 moves the copied columns by up to 2⁻⁸ of their
size). Even halves would be exact, but copies with equal columns receive equal gradients and stay
identical under any optimiser; uneven parts let them diverge from the second step.
"""

from typing import Literal

import torch
from pydantic import Field, model_validator

from rehead import architectures
from rehead.errors import ReheadError
from rehead.layouts.configuration_gda import GDAConfig, diff_lambda_init
from rehead.layouts.modeling_gda import GDADecoderLayer

from .engine import LayerInput, Rewriter, build_layer, head_statistics, llama_values
from .options import ConvertOptions

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


class GDARewriter(Rewriter):
    layout = "gda"
    Options = GDAOptions
    source_layouts = ("gda",)  # --grow-signal

    def setup(self, source_config: dict) -> None:
        super().setup(source_config)
        o = self.options
        self.growth = source_config.get("model_type") == GDAConfig.model_type
        if self.growth:
            self.setup_growth(source_config)
            return
        if o.grow_signal is not None:
            raise ReheadError(
                f"--grow-signal {o.grow_signal} grows a GDA checkpoint; this source is a stock "
                f"{source_config.get('model_type')} one: convert it with --to gda --ratio G first, then grow that"
            )
        if o.ratio is None:  # a GDA source needs none (--grow-signal), so this is checked against the source
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
        self.noise_choice: list[list[int]] = []
        layers = self.llama.num_hidden_layers
        self.lambda_init = [diff_lambda_init(layer + 1) for layer in range(layers)] if o.subln else [0.0] * layers

    def setup_growth(self, source_config: dict) -> None:
        o = self.options
        given = o.model_fields_set & {"ratio", "mode", "subln", "lambda_"}
        if o.grow_signal is None:
            raise ReheadError("this source is already a GDA checkpoint: grow its signal heads with --grow-signal N, "
                              "or convert from the original model")
        if given:
            flags = ", ".join("--" + name.rstrip("_").replace("_", "-") for name in sorted(given))
            raise ReheadError(f"--grow-signal keeps the source's noise heads, λ and sub-norm: drop {flags}")
        self.source = GDAConfig.from_dict({k: v for k, v in source_config.items() if k != "auto_map"})
        self.source._attn_implementation = "sdpa"
        heads, kv, noise = self.source.num_attention_heads, self.source.num_key_value_heads, self.source.gda_noise_heads
        step = growth_step(heads, kv, noise)
        if o.grow_signal < 1 or o.grow_signal % step:
            why = "must be at least 1" if o.grow_signal < 1 else (
                f"each noise group of {heads // noise} signal heads spans {step} KV heads, and copies read their "
                "original's KV head, which must keep as many readers as the others")
            fits = ", ".join(str(step * m) for m in range(1, 4))
            raise ReheadError(f"--grow-signal {o.grow_signal}: {why}; values that fit: multiples of {step} ({fits}, …)")
        self.head_dim = self.source.head_dim
        self.heads = heads
        self.copy_of, self.share = grow_signal_heads(heads, kv, noise, o.grow_signal)

    @property
    def needs_calibration(self) -> bool:
        return not self.growth and self.options.mode == "repurpose"

    def config(self) -> GDAConfig:
        if self.growth:
            config = GDAConfig(**{**llama_values(self.source), "num_attention_heads": len(self.copy_of)})
        else:
            values = llama_values(self.llama)
            values.update(num_attention_heads=self.signal_heads, num_key_value_heads=self.kv_out,
                          head_dim=self.head_dim)
            config = GDAConfig(**values, gda_noise_heads=self.noise_heads, gda_subln=self.options.subln,
                               gda_lambda=self.options.lambda_, gda_lambda_init=self.lambda_init)
        config._attn_implementation = "sdpa"
        return config

    def source_module(self, index: int, tensors: dict[str, torch.Tensor], llama_config, device: str):
        if not self.growth:
            return super().source_module(index, tensors, llama_config, device)
        return build_layer(GDADecoderLayer, self.source, index, tensors, device)

    def rewrite_layer(self, layer: LayerInput) -> dict[str, torch.Tensor]:
        if self.growth:
            return self.grow_layer(layer)
        t = dict(layer.tensors)
        d = self.head_dim
        t = architectures.with_o_proj_bias(t, self.llama)

        def heads(name, count):
            return t[name].unflatten(0, (count, d))

        groups = [list(range(n * self.size, (n + 1) * self.size)) for n in range(self.noise_heads)]
        projections = [("q_proj", self.heads), ("k_proj", self.kv), ("v_proj", self.kv)]
        parts = ["weight"] + (["bias"] if self.llama.attention_bias else [])
        noise = {}
        if self.options.mode == "grow":
            signal = list(range(self.heads))
            for part in parts:
                q, k = heads(f"self_attn.q_proj.{part}", self.heads), heads(f"self_attn.k_proj.{part}", self.kv)
                noise[f"q_proj.{part}"] = torch.stack([q[g].mean(0) for g in groups]).flatten(0, 1)
                noise[f"k_proj.{part}"] = torch.stack([k[sorted({self.reads[i] for i in g})].mean(0)
                                                       for g in groups]).flatten(0, 1)
            kept_kv = list(range(self.kv))
        else:
            importance = head_statistics(layer)[2].mean(0)
            victims = [min(g, key=lambda i: importance[i].item()) for g in groups]
            self.noise_choice.append(victims)
            signal = [i for i in range(self.heads) if i not in victims]
            kept_kv = sorted({self.reads[i] for i in signal})
            for part in parts:
                q, k = heads(f"self_attn.q_proj.{part}", self.heads), heads(f"self_attn.k_proj.{part}", self.kv)
                noise[f"q_proj.{part}"] = q[victims].flatten(0, 1)
                noise[f"k_proj.{part}"] = k[[self.reads[i] for i in victims]].flatten(0, 1)
            for name, count in projections:
                keep = signal if name == "q_proj" else kept_kv
                for part in parts:
                    t[f"self_attn.{name}.{part}"] = heads(f"self_attn.{name}.{part}", count)[keep].flatten(0, 1)
            o = t["self_attn.o_proj.weight"].unflatten(1, (self.heads, d))
            t["self_attn.o_proj.weight"] = o[:, signal].flatten(1)
        t.update({f"self_attn.noise.{name}": w for name, w in noise.items()})
        if self.options.lambda_ == "diff":
            t.update({f"self_attn.{name}": w for name, w in diff_lambda_factors(layer.index, d).items()})
        else:
            t["self_attn.diff_lambda"] = torch.zeros(len(signal))
        if self.options.subln:
            t["self_attn.subln.weight"] = torch.ones(d)
        return t

    def grow_layer(self, layer: LayerInput) -> dict[str, torch.Tensor]:
        """Copies of signal heads: their q_proj rows (and λ_i), and shares of their o_proj columns."""
        t = dict(layer.tensors)
        copy_of = torch.tensor(self.copy_of)
        for part in ("weight", "bias"):
            name = f"self_attn.q_proj.{part}"
            if name in t:
                t[name] = t[name].unflatten(0, (self.heads, self.head_dim))[copy_of].flatten(0, 1)
        o = t["self_attn.o_proj.weight"].unflatten(1, (self.heads, self.head_dim))
        share = torch.tensor(self.share, dtype=torch.float64)[None, :, None]
        t["self_attn.o_proj.weight"] = (o[:, copy_of].double() * share).to(o.dtype).flatten(1)
        if "self_attn.diff_lambda" in t:  # --lambda plain: one λ per head; diff's per-layer λ stays as it is
            t["self_attn.diff_lambda"] = t["self_attn.diff_lambda"][copy_of]
        return t

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor]):
        return build_layer(GDADecoderLayer, self.config(), index, tensors, self.options.device)

    def target_config(self) -> dict:
        return self.config().to_dict()

    def plan(self) -> dict:
        if self.growth:
            return {
                "mode": "grow-signal",
                "added_per_noise_group": self.options.grow_signal,
                "source_signal_heads": self.heads,
                "signal_heads": len(self.copy_of),
                "noise_heads": self.source.gda_noise_heads,
                "kv_heads": self.source.num_key_value_heads,
                "copy_of": self.copy_of,
                "o_proj_share": [round(s, 6) for s in self.share],
            }
        return {
            "mode": self.options.mode,
            "ratio": self.options.ratio,
            "signal_heads": self.signal_heads,
            "noise_heads": self.noise_heads,
            "kv_heads": self.kv_out,
            "subln": self.options.subln,
            "lambda": self.options.lambda_,
            "lambda_init_per_layer": [round(x, 6) for x in self.lambda_init],
            "repurposed_heads_per_layer": self.noise_choice or None,
        }
