"""Qwen3 (``Qwen3ForCausalLM``, dense): a LLaMA block with an RMSNorm over head_dim on every head's
query and key before RoPE (``q_norm``, ``k_norm``: one weight of head_dim per layer, shared by the
heads) and a head_dim of its own (Qwen3-0.6B: hidden 1024, 16 heads of 128).

In the LLaMA form this is ``qk_norm: true`` and the tensors ``self_attn.{q,k}_norm.weight``; the
layouts hold the norms (rehead.layouts.modeling_stack.head_norms) and the conversions that cannot
(MLA's latent, the DeciLM export) refuse such a source.
"""

from rehead.errors import ReheadError

from .llama import Llama
from .qwen2 import SLIDING


class Qwen3(Llama):
    model_type = "qwen3"
    title = "Qwen3"
    limits = ("per-head q/k norms, held by MoH, DHA, GDA and --to mha; refused by --to mla and --export deci; "
              "without use_sliding_window")

    def check(self, config: dict, where: str) -> None:
        sliding = [i for i, kind in enumerate(config.get("layer_types") or []) if kind != "full_attention"]
        if config.get("use_sliding_window") or sliding:
            raise ReheadError(
                f"{where}: Qwen3 with a sliding window (use_sliding_window={config.get('use_sliding_window')}, "
                f"{len(sliding)} sliding layers) is not supported: the converted layouts attend to the full context"
            )
        super().check(config, where)

    def llama_values(self, config: dict) -> dict:
        values = {k: v for k, v in super().llama_values(config).items() if k not in SLIDING}
        return {**values, "qk_norm": True}
