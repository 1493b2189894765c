"""Phi-3, Phi-3.5 and Phi-4 (``Phi3ForCausalLM``): LLaMA blocks stored with fused projections.

``self_attn.qkv_proj`` holds the rows [q; k; v] (H·d, KV·d, KV·d); ``mlp.gate_up_proj`` holds
[gate; up] (I, I), and Phi3MLP's ``gate, up = gate_up_proj(x).chunk(2)``, ``down(up · act(gate))`` is
LLaMA's ``down(act(gate(x)) · up(x))``. The rest is LLaMA's: RMSNorm, rotate-half RoPE (with longrope
scaling, which transformers' Llama rotary embedding computes the same way), residual dropouts that
are the identity at inference.
"""

from rehead.errors import ReheadError

from .llama import Llama, head_dim_of


def rope_of(config: dict) -> dict:
    """The config's RoPE parameters, in either spelling config.json has had (``rope_parameters``, ``rope_scaling``)."""
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


class Phi3(Llama):
    model_type = "phi3"
    title = "Phi-3, Phi-3.5, Phi-4"
    limits = ("fused qkv_proj and gate_up_proj split on read and fused back in a Phi-3 output; full rotary only "
              "(not Phi-4-mini's partial_rotary_factor); a sliding window only where it spans the context")

    def check(self, config: dict, where: str) -> None:
        rope = rope_of(config)
        partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ReheadError(
                f"{where}: partial_rotary_factor {partial}: RoPE turns only that fraction of each head's dimensions "
                "(Phi-4-mini), and rehead's layouts rotate all of them (LLaMA's RoPE); this model is not supported"
            )
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "longrope"):
            raise ReheadError(f"{where}: rope type {kind!r}: rehead reads Phi-3 with default or longrope RoPE only")
        window, context = config.get("sliding_window"), config.get("max_position_embeddings")
        if window is not None and (context is None or window < context):
            raise ReheadError(
                f"{where}: Phi-3 with sliding_window={window} and max_position_embeddings={context}: a token attends "
                "to the last sliding_window tokens only, and the converted layouts attend to the full context; use a "
                "checkpoint whose window spans its context (Phi-3-mini-128k, Phi-3.5-mini)"
            )
        size = config.get("intermediate_size")
        if not isinstance(size, int) or size <= 0:
            raise ReheadError(f"{where}: config.json's intermediate_size is {size!r}; it must be a positive integer "
                              "(gate_up_proj is split at it)")
        super().check(config, where)

    def llama_values(self, config: dict) -> dict:
        dropped = ("sliding_window", "resid_pdrop", "embd_pdrop", "rope_scaling", "rope_parameters",
                   "partial_rotary_factor")
        values = {k: v for k, v in super().llama_values(config).items() if k not in dropped}
        rope = rope_of(config)
        if rope:
            rope["rope_type"] = rope.pop("type", None) or rope.get("rope_type", "default")
            if rope["rope_type"] == "longrope" and "original_max_position_embeddings" in config:
                # Phi3Config prefers its own field to the one in the RoPE parameters; LlamaConfig would not see it
                rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
            values["rope_parameters"] = rope
        return values

    def stored(self, config: dict) -> dict[str, list[tuple[str, int]]]:
        d = head_dim_of(config)
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        return {
            "self_attn.qkv_proj.weight": [("self_attn.q_proj.weight", heads * d), ("self_attn.k_proj.weight", kv * d),
                                          ("self_attn.v_proj.weight", kv * d)],
            "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", config["intermediate_size"]),
                                        ("mlp.up_proj.weight", config["intermediate_size"])],
        }
