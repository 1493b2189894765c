"""Configuration of the GDA layout (Lim et al. 2025, "Grouped Differential Attention").

This file travels inside converted checkpoints: it imports only transformers.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

LAMBDAS = ("plain", "diff")


def diff_lambda_init(layer: int) -> float:
    """The DIFF Transformer's depth schedule, λ_init(l) = 0.8 − 0.6·exp(−0.3·(l − 1)), layers l counted from 1."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


@strict
class GDAConfig(LlamaConfig):
    r"""A LLaMA configuration with differential attention: many signal heads, few noise-control heads.

    num_attention_heads are the signal heads; gda_noise_heads noise heads each serve a contiguous
    group of num_attention_heads / gda_noise_heads signal heads, and their keys are cached beside
    the signal keys.
    gda_lambda: how λ is parameterised. "plain": one parameter λ_i per signal head. "diff": the DIFF
        Transformer's one λ per layer, λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init.
    gda_lambda_init: DIFF's λ_init per layer (a single number applies to every layer): the constant
        of the "diff" λ and the sub-norm's (1 − λ_init) scale.
    gda_subln: the DIFF Transformer's per-head RMSNorm of the head outputs, scaled by (1 − λ_init).
    """

    model_type = "rehead_gda"

    qk_norm: bool = False  # the source's per-head q/k norms before RoPE (Qwen3)
    gda_noise_heads: int = 1
    gda_subln: bool = False
    gda_lambda: str = "plain"
    gda_lambda_init: list | float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # one number for every layer, as configs written before the per-layer schedule have it
        if not isinstance(self.gda_lambda_init, list):
            self.gda_lambda_init = [float(self.gda_lambda_init)] * self.num_hidden_layers

    # what rehead's inspect and model card say about the layout
    layout_summary = ("grouped differential attention (GDA, Lim et al. 2025): many signal heads share few "
                      "noise-control heads")

    @property
    def gda_ratio(self) -> int:
        return self.num_attention_heads // self.gda_noise_heads

    def kv_heads_per_layer(self) -> tuple[list[int], list[int]]:
        """Noise keys are cached beside the signal keys; values are shared."""
        layers, kv = self.num_hidden_layers, self.num_key_value_heads
        return [kv + self.gda_noise_heads] * layers, [kv] * layers

    def layout_facts(self, read=None) -> dict:
        """``read(name)``, where given, reads a tensor of the checkpoint: λ then tells how far training has
        moved each layer away from the source's attention."""
        facts = {"signal_heads": self.num_attention_heads, "noise_heads": self.gda_noise_heads,
                 "ratio": self.gda_ratio, "subln": self.gda_subln, "lambda": self.gda_lambda}
        if read is not None:
            lambdas = [self.layer_lambda(read, i) for i in range(self.num_hidden_layers)]
            facts["lambda_mean_abs"] = round(sum(x.abs().mean().item() for x in lambdas) / len(lambdas), 6)
            facts["lambda_max_abs"] = round(max(x.abs().max().item() for x in lambdas), 6)
        return facts

    def layer_lambda(self, read, layer: int):
        """Layer ``layer``'s λ from its tensors: one per signal head, or DIFF's exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2)
        + λ_init."""
        prefix = f"model.layers.{layer}.self_attn."
        if self.gda_lambda == "plain":
            return read(prefix + "diff_lambda").float()
        q1, k1, q2, k2 = (read(prefix + f"lambda_{name}").double() for name in ("q1", "k1", "q2", "k2"))
        return ((q1 @ k1).exp() - (q2 @ k2).exp() + self.gda_lambda_init[layer]).reshape(1)

    def card_lines(self) -> list[str]:
        return [f"- {self.num_attention_heads} signal heads and {self.gda_noise_heads} shared noise-control heads "
                "per layer (differential attention)"]

    def validate_architecture(self):
        # head_dim is explicit: repurposing heads leaves hidden_size no multiple of the head count
        heads, noise, kv = self.num_attention_heads, self.gda_noise_heads, self.num_key_value_heads
        if heads % kv:
            raise ValueError(f"{heads} signal heads cannot be grouped over {kv} KV heads")
        if not 1 <= noise <= heads or heads % noise:
            raise ValueError(f"gda_noise_heads {noise}: must divide the {heads} signal heads")
        ratio, group = heads // noise, heads // kv
        if ratio % group and group % ratio:
            raise ValueError(
                f"{noise} noise heads give groups of {ratio} signal heads, which do not line up with the "
                f"KV groups of {group}"
            )
        if self.gda_lambda not in LAMBDAS:
            raise ValueError(f"gda_lambda {self.gda_lambda!r}: must be one of {', '.join(LAMBDAS)}")
        if len(self.gda_lambda_init) != self.num_hidden_layers:
            raise ValueError(
                f"gda_lambda_init has {len(self.gda_lambda_init)} values for {self.num_hidden_layers} layers: "
                "give one per layer, or one number for all"
            )
