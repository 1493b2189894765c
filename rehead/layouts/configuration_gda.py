"""Configuration of the GDA layout (Lim et al. 2025, "Grouped Differential Attention").

This file travels inside converted checkpoints: it imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class GDAConfig(LlamaConfig):
    r"""A LLaMA configuration with differential attention: many signal heads, few noise-control heads.

    num_attention_heads are the signal heads; gda_noise_heads noise heads each serve a contiguous
    group of num_attention_heads / gda_noise_heads signal heads, and their keys are cached beside
    the signal keys. gda_subln adds the DIFF Transformer's per-head RMSNorm and (1 − λ_init) scale.
    """

    model_type = "rehead_gda"

    gda_noise_heads: int = 1
    gda_subln: bool = False
    gda_lambda_init: float = 0.0

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
                 "ratio": self.gda_ratio, "subln": self.gda_subln}
        if read is not None:
            lambdas = [read(f"model.layers.{i}.self_attn.diff_lambda").float() for i in range(self.num_hidden_layers)]
            facts["lambda_mean_abs"] = round(sum(x.abs().mean().item() for x in lambdas) / len(lambdas), 6)
            facts["lambda_max_abs"] = round(max(x.abs().max().item() for x in lambdas), 6)
        return facts

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
