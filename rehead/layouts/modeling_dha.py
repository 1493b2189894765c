"""DHA: Decoupled-Head Attention (Chen et al. 2024, arXiv 2406.06567).

The LLaMA decoder stack with one change: each layer has its own number of key heads and of value
heads, and each query head reads one of each (``key_head_of_query``, ``value_head_of_query``).
The KV cache holds only the fused heads, and decoding reads each of them once: the queries are
grouped by the key head they read, the attention weights regrouped by the value head.

    head_i = softmax(q_i · K_{κ(i)}ᵀ / √d) · V_{ν(i)}

This file travels inside converted checkpoints: it imports only torch and transformers.
"""


import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from .configuration_dha import DHAConfig
from .modeling_cache import LayoutCacheMixin
from .modeling_stack import LayoutAttention, LayoutDecoderLayer, LayoutForCausalLM, LayoutModel, attend, project, softmax_weights

# Up to this many query tokens per step (decoding), a layer whose K and V are not plain grouped-query
# attention attends against the fused heads themselves (`fused_attention`); above it (prefill,
# training), K and V are gathered up to every query head for the attention kernel, which is then
# faster. Measured on CPU-2: `python scripts/bench_decode.py --kernels` (BENCHMARKS.md).
FUSED_QUERY_TOKENS = 32


def fused_slots(key_of_query: list[int], value_of_query: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Index maps of ``fused_attention``: which query head fills each slot of the key groups (each
    group padded to the largest with a copy of its first member), which key slot's weights fill each
    slot of the value groups (padded alike), and which value slot holds each query head's output."""
    def groups(head_of_query):
        members = [[i for i, h in enumerate(head_of_query) if h == j] for j in range(max(head_of_query) + 1)]
        width = max(map(len, members))
        padded = [[m[g] if g < len(m) else m[0] for g in range(width)] for m in members]
        slot = {i: j * width + g for j, m in enumerate(members) for g, i in enumerate(m)}
        return [i for m in padded for i in m], slot

    query_of_key_slot, key_slot = groups(key_of_query)
    query_of_value_slot, value_slot = groups(value_of_query)
    key_slot_of_value_slot = [key_slot[i] for i in query_of_value_slot]
    return query_of_key_slot, key_slot_of_value_slot, [value_slot[i] for i in range(len(key_of_query))]


class DHAAttention(LayoutAttention):
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
        # key_of_query, value_of_query and the three ``fused_slots`` maps
        self.index_maps = (self.key_of_query, self.value_of_query, *fused_slots(self.key_of_query, self.value_of_query))
        self.q_pair_scale = nn.Parameter(torch.empty(heads, self.head_dim)) if config.dha_query_scale else None

    def project_states(self, hidden_states, position_embeddings):
        """LLaMA's queries (with their pair scales, ``dha_query_scale``), keys and values. A complex scale
        a + ib of RoPE pair (t, t + d/2) commutes with RoPE's rotation of that pair, so it is applied to
        the rotated query: q·a + rotate_half(q)·b."""
        query, key, value = project(self, hidden_states, position_embeddings)
        if self.q_pair_scale is not None:
            real, imag = self.q_pair_scale.to(query.dtype)[:, None].chunk(2, -1)  # (H, 1, d/2) each
            query = query * torch.cat([real, real], -1) + rotate_half(query) * torch.cat([imag, imag], -1)
        return query, key, value, None

    def init_layout_parameters(self) -> None:
        if self.q_pair_scale is not None:  # the scale 1 + 0i: the source's queries
            with torch.no_grad():
                self.q_pair_scale.copy_(torch.cat([torch.ones(self.head_dim // 2), torch.zeros(self.head_dim // 2)]))

    def fused_attention(self, query, key, value, attention_mask):
        """Attention of every query head against the fused heads, each read once.

        query (B, H, T, d); key (B, K, S, d); value (B, V, S, d). The queries reading key head j form
        the rows of one matrix against K_j; the weights of the queries reading value head m form the
        rows of one matrix against V_m. Returns (B, T, H, d) and, with eager attention, the weights.
        """
        _, _, query_of_key_slot, key_slot_of_value_slot, value_slot = self.indices(query.device)
        batch, _, length, dim = query.shape
        keys, values, span = key.shape[1], value.shape[1], key.shape[2]
        grouped = (query * self.scaling).index_select(1, query_of_key_slot).view(batch, keys, -1, dim)
        scores = torch.matmul(grouped, key.transpose(2, 3)).view(batch, -1, length, span)
        weights = softmax_weights(scores, attention_mask, query.dtype)
        by_value = weights.index_select(1, key_slot_of_value_slot).view(batch, values, -1, span)
        output = torch.matmul(by_value, value).view(batch, -1, length, dim).index_select(1, value_slot)
        if self.config._attn_implementation != "eager":
            return output.transpose(1, 2), None
        key_slot_of_query = key_slot_of_value_slot.index_select(0, value_slot)
        return output.transpose(1, 2), weights.index_select(1, key_slot_of_query)

    def attention_step(self, query, key, value, attention_mask, extra, **kwargs):
        """The cache holds the fused heads only: plain grouped-query attention where K and V share
        contiguous groups, else ``fused_attention`` (decoding) or K and V gathered per query head."""
        if self.grouped:
            return attend(self, self, query, key, value, attention_mask, **kwargs)
        if (query.shape[2] <= FUSED_QUERY_TOKENS and not self.training
                and self.config._attn_implementation in ("eager", "sdpa")):
            return self.fused_attention(query, key, value, attention_mask)
        key_of_query, value_of_query = self.indices(key.device)[:2]
        key, value = key.index_select(1, key_of_query), value.index_select(1, value_of_query)
        return attend(self, self, query, key, value, attention_mask, **kwargs)


class DHADecoderLayer(LayoutDecoderLayer):
    attention_class = DHAAttention


class DHAModel(LayoutModel):
    config_class, decoder_layer_class = DHAConfig, DHADecoderLayer


class DHAForCausalLM(LayoutCacheMixin, LayoutForCausalLM):
    # what the conversion made (rehead tune's `trainable: new`): the fused key and value projections
    _rehead_new_parameters = (r"\.self_attn\.[kv]_proj\.", r"\.self_attn\.q_pair_scale$")
    model_class = DHAModel


__all__ = ["DHAForCausalLM", "DHAModel"]
