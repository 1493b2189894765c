"""DeciLM (``nemotron-nas``) for transformers, which has none built in: the LLaMA decoder stack in
which layer l keeps num_attention_heads / n_heads_in_group(l) KV heads, each read by a contiguous
group of query heads (grouped-query attention with a per-layer group size), and an FFN of width
ffn_mult_to_intermediate_size(ffn_mult(l)).

rehead writes its DHA conversions in this form when every layer's K and V share equal,
contiguous groups (``--export deci``); vLLM and llama.cpp serve the same files natively.

This file travels inside converted checkpoints: it imports only torch and transformers.
"""

import copy

from transformers import GenerationMixin
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from .configuration_deci import DeciLMConfig
from .modeling_stack import init_causal_lm, init_stack


class DeciLMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DeciLMConfig, layer_idx: int):
        layer = copy.copy(config)  # LLaMA's layer, built at this layer's sizes
        layer.num_key_value_heads = config.heads_kv_per_layer[layer_idx]
        layer.intermediate_size = config.intermediate_size_per_layer[layer_idx]
        super().__init__(layer, layer_idx)
        # the modules keep the model's config, so that switching the attention implementation reaches them
        self.self_attn.config = self.mlp.config = config


class DeciLMPreTrainedModel(LlamaPreTrainedModel):
    config_class = DeciLMConfig
    _no_split_modules = ["DeciLMDecoderLayer"]


class DeciLMModel(DeciLMPreTrainedModel, LlamaModel):
    def __init__(self, config: DeciLMConfig):
        init_stack(self, config, DeciLMDecoderLayer)


class DeciLMForCausalLM(DeciLMPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    # what the conversion made (rehead tune's `trainable: new`): the fused key and value projections
    _rehead_new_parameters = (r"\.self_attn\.[kv]_proj\.",)

    def __init__(self, config: DeciLMConfig):
        init_causal_lm(self, config, DeciLMModel)


__all__ = ["DeciLMForCausalLM", "DeciLMModel", "DeciLMPreTrainedModel"]
