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

    @property
    def gda_ratio(self) -> int:
        return self.num_attention_heads // self.gda_noise_heads

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
