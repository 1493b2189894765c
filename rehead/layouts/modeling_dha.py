"""DHA: Decoupled-Head Attention (Chen et al. 2024, arXiv 2406.06567).

The LLaMA decoder stack with one change: each layer has its own number of key heads and of value
heads, and each query head reads one of each (``key_head_of_query``, ``value_head_of_query``).
The KV cache holds only the fused heads.

    head_i = softmax(q_i · K_{κ(i)}ᵀ / √d) · V_{ν(i)}

This file travels inside converted checkpoints: it imports only torch and transformers.
"""


import torch
from torch import nn
from transformers import GenerationMixin
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
)

from .configuration_dha import DHAConfig
from .modeling_cache import LayoutCacheMixin
from .modeling_stack import attend, init_causal_lm, init_stack, project


class DHAAttention(LlamaAttention):
    def __init__(self, config: DHAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        heads = config.num_attention_heads
        self.key_heads = config.key_heads_per_layer[layer_idx]
        self.value_heads = config.value_heads_per_layer[layer_idx]
        self.key_of_query = list(config.key_head_of_query[layer_idx])
        self.value_of_query = list(config.value_head_of_query[layer_idx])
        self.k_proj = nn.Linear(config.hidden_size, self.key_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.value_heads * self.head_dim, bias=config.attention_bias)
        self.cache_heads = (self.key_heads, self.value_heads)  # the KV cache holds the fused heads only
        # When K and V share contiguous groups this is plain grouped-query attention: the attention
        # kernels repeat the heads themselves. Otherwise each query head's K and V are gathered.
        group = heads // self.key_heads if heads % self.key_heads == 0 else 0
        contiguous = group > 0 and self.key_of_query == [i // group for i in range(heads)]
        self.grouped = contiguous and self.key_of_query == self.value_of_query
        self.num_key_value_groups = group if self.grouped else 1
        self._index = {}

    def _maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._index:
            self._index[device] = (
                torch.tensor(self.key_of_query, dtype=torch.long, device=device),
                torch.tensor(self.value_of_query, dtype=torch.long, device=device),
            )
        return self._index[device]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = cache if cache is not None else past_key_values  # renamed in transformers 5.24
        query_states, key_states, value_states = project(self, hidden_states, position_embeddings)
        if cache is not None:  # the cache holds the fused heads only
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        if not self.grouped:
            key_of_query, value_of_query = self._maps(key_states.device)
            key_states = key_states.index_select(1, key_of_query)
            value_states = value_states.index_select(1, value_of_query)
        attn_output, attn_weights = attend(self, self, query_states, key_states, value_states, attention_mask, **kwargs)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class DHADecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DHAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = DHAAttention(config, layer_idx)


class DHAPreTrainedModel(LlamaPreTrainedModel):
    config_class = DHAConfig
    _no_split_modules = ["DHADecoderLayer"]


class DHAModel(DHAPreTrainedModel, LlamaModel):
    def __init__(self, config: DHAConfig):
        init_stack(self, config, DHADecoderLayer)


class DHAForCausalLM(LayoutCacheMixin, DHAPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    # what the conversion made (rehead tune's `trainable: new`): the fused key and value projections
    _rehead_new_parameters = (r"\.self_attn\.[kv]_proj\.",)

    def __init__(self, config: DHAConfig):
        init_causal_lm(self, config, DHAModel)


__all__ = ["DHAForCausalLM", "DHAModel", "DHAPreTrainedModel"]
