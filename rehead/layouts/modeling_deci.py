"""DeciLM (``nemotron-nas``) for transformers, which has none built in: the LLaMA decoder stack in
which layer l keeps num_attention_heads / n_heads_in_group(l) KV heads, each read by a contiguous
group of query heads (grouped-query attention with a per-layer group size), and an FFN of width
ffn_mult_to_intermediate_size(ffn_mult(l)).

rehead writes its DHA conversions in this form when every layer's K and V share equal,
contiguous groups (``--export deci``); vLLM and llama.cpp serve the same files natively.

This file travels inside converted checkpoints: it imports only torch and transformers.
"""

import copy

from .configuration_deci import DeciLMConfig
from .modeling_stack import LayoutDecoderLayer, LayoutForCausalLM, LayoutModel


class DeciLMDecoderLayer(LayoutDecoderLayer):
    @staticmethod
    def layer_sizes(config: DeciLMConfig, layer_idx: int) -> DeciLMConfig:
        """LLaMA's layer at this layer's KV heads and FFN width."""
        layer = copy.copy(config)
        layer.num_key_value_heads = config.heads_kv_per_layer[layer_idx]
        layer.intermediate_size = config.intermediate_size_per_layer[layer_idx]
        return layer


class DeciLMModel(LayoutModel):
    config_class, decoder_layer_class = DeciLMConfig, DeciLMDecoderLayer


class DeciLMForCausalLM(LayoutForCausalLM):
    # what the conversion made (rehead tune's `trainable: new`): the fused key and value projections
    _rehead_new_parameters = (r"\.self_attn\.[kv]_proj\.",)
    model_class = DeciLMModel


__all__ = ["DeciLMForCausalLM", "DeciLMModel"]
