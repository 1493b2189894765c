"""``--to gda``: grouped differential attention from a trained checkpoint.

``grow`` keeps every source head as a signal head and adds one noise-control head per G signal
heads, its query and key the mean of its group's (λ = 0: exactly the source's function).
``repurpose`` turns the least important head of each G + 1 (the one contributing least to the
attention output on calibration text) into its group's noise head: its query becomes the
noise query and its KV head's key the noise key, so the noise map starts as that head's own
attention map; the head count stays the same.
"""

from typing import Literal

import torch
from pydantic import Field, model_validator

from rehead import architectures
from rehead.errors import ReheadError
from rehead.layouts.configuration_gda import GDAConfig
from rehead.layouts.modeling_gda import GDADecoderLayer

from .engine import LayerInput, Rewriter, build_layer, head_statistics, llama_values
from .options import ConvertOptions


class GDAOptions(ConvertOptions):
    to: Literal["gda"] = "gda"
    ratio: int | None = Field(None, description="one noise-control head per G signal heads, aligned with the KV "
                                                "groups (the error lists the values that fit)")
    mode: Literal["grow", "repurpose"] = Field(
        "grow", description="grow: add the noise heads (exactly the source at λ = 0); repurpose: turn the least "
                            "important head of each G + 1 into its group's noise head")
    subln: bool = Field(False, description="the DIFF Transformer's per-head RMSNorm and (1 - λ_init) scale "
                                           "(changes the function)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.ratio is None:
            raise ReheadError("--to gda needs --ratio G: one noise-control head per G signal heads")
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


class GDARewriter(Rewriter):
    layout = "gda"
    Options = GDAOptions
    preset = dict(ratio=3)  # one noise-control head per 3 signal heads, grown from the source
    trainable = "new"

    def setup(self, source_config: dict) -> None:
        super().setup(source_config)
        o = self.options
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

    @property
    def needs_calibration(self) -> bool:
        return self.options.mode == "repurpose"

    def config(self) -> GDAConfig:
        values = llama_values(self.llama)
        values.update(num_attention_heads=self.signal_heads, num_key_value_heads=self.kv_out, head_dim=self.head_dim)
        config = GDAConfig(**values, gda_noise_heads=self.noise_heads, gda_subln=self.options.subln)
        config._attn_implementation = "sdpa"
        return config

    def rewrite_layer(self, layer: LayerInput) -> dict[str, torch.Tensor]:
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
        t["self_attn.diff_lambda"] = torch.zeros(len(signal))
        if self.options.subln:
            t["self_attn.subln.weight"] = torch.ones(d)
        return t

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor]):
        return build_layer(GDADecoderLayer, self.config(), index, tensors, self.options.device)

    def target_config(self) -> dict:
        return self.config().to_dict()

    def plan(self) -> dict:
        return {
            "mode": self.options.mode,
            "ratio": self.options.ratio,
            "signal_heads": self.signal_heads,
            "noise_heads": self.noise_heads,
            "kv_heads": self.kv_out,
            "subln": self.options.subln,
            "repurposed_heads_per_layer": self.noise_choice or None,
        }
