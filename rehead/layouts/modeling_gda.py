"""GDA: Grouped Differential Attention (Lim et al. 2025, arXiv 2510.06949).

The LLaMA decoder stack with differential attention: signal head i keeps its own attention map
A1_i; the noise-control head n(i) of its group computes one map A2_n, which is subtracted,
scaled by a learnable λ_i, from every signal head of the group:

    out_i = (A1_i − λ_i · A2_n(i)) · V_i

The noise map is computed once per noise head: its value is the concatenation of the distinct
V heads of its group (kernels that need equal head dims, flash-attention, get one head_dim-wide
V head per call instead, the noise query and key repeated). Decoding (`decode_attention`) forms
A1_i − λ_i·A2_n(i) before the maps meet V, so a step reads each cached head once. λ is a parameter
per signal head or the DIFF Transformer's per-layer re-parameterisation; either starts at exactly 0
after a conversion, where the layer is the source's attention.

This file travels inside converted checkpoints: it imports only torch and transformers.
"""


import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_gda import GDAConfig
from .modeling_cache import LayoutCacheMixin
from .modeling_stack import (
    LayoutAttention,
    LayoutDecoderLayer,
    LayoutForCausalLM,
    LayoutModel,
    attend,
    head_norms,
    project,
    softmax_weights,
)

# Up to this many query tokens per step (decoding), `decode_attention` combines the signal and noise
# maps before they meet V; above it (prefill, training), both maps go through the attention kernel.
# Measured on CPU-2: `python scripts/bench_decode.py --kernels` and `--paths` (BENCHMARKS.md).
DECODE_QUERY_TOKENS = 16


class NoiseAttention(nn.Module):
    """The noise-control heads' own queries and keys; passed to the attention kernels as their module."""

    def __init__(self, config: GDAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = True
        self.num_key_value_groups = 1
        self.head_dim = config.head_dim
        width = config.gda_noise_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, width, bias=config.attention_bias)
        head_norms(config, self)  # a source's per-head q/k norms (Qwen3): the noise heads have them too


# the attention kernels that take values wider than the queries and keys; others (flash) get equal head dims
WIDE_VALUE_KERNELS = ("eager", "sdpa")


class GDAAttention(LayoutAttention):
    def __init__(self, config: GDAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        heads, kv, noise = config.num_attention_heads, config.num_key_value_heads, config.gda_noise_heads
        self.noise = NoiseAttention(config, layer_idx)
        self.cache_heads = (kv + noise, kv)  # noise keys beside the signal keys; the values are shared
        self.lambda_init = config.gda_lambda_init[layer_idx]
        if config.gda_lambda == "diff":  # DIFF: λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init, one per layer
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.zeros(self.head_dim)))
        else:
            self.diff_lambda = nn.Parameter(torch.zeros(heads))  # λ_i, a plain parameter: non-zero gradient at step 0
        if config.gda_subln:
            self.subln = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        ratio, group = heads // noise, heads // kv
        kv_of = [i // group for i in range(heads)]
        # the distinct V heads of each noise group, and where signal head i finds its noise output
        self.noise_values = [sorted({kv_of[i] for i in range(n * ratio, (n + 1) * ratio)}) for n in range(noise)]
        width = len(self.noise_values[0])
        self.noise_slot = [(i // ratio) * width + self.noise_values[i // ratio].index(kv_of[i]) for i in range(heads)]
        # noise groups that read the KV heads in their own order take V as it is (no copy of the cached V)
        self.index_maps = ([j for values in self.noise_values for j in values], self.noise_slot)
        self.values_in_order = self.index_maps[0] == list(range(kv))

    def lambdas(self) -> torch.Tensor:
        """λ of every signal head, float32."""
        if self.config.gda_lambda == "diff":
            lambda_1 = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum())
            lambda_2 = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum())
            return (lambda_1 - lambda_2 + self.lambda_init).expand(self.config.num_attention_heads)
        return self.diff_lambda.float()

    def noise_attention(self, query, key, values, attention_mask, **kwargs) -> torch.Tensor:
        """A2_n · V_j for every noise head n and each of its group's distinct V heads j.

        query, key: (B, noise, T|S, d); values: (B, noise·width, S, d), the V heads of noise head n at
        n·width … n·width + width − 1. Returns (B, T, noise·width, d).
        """
        width = values.shape[1] // query.shape[1]
        if width == 1:
            return attend(self, self.noise, query, key, values, attention_mask, **kwargs)[0]
        if self.config._attn_implementation in WIDE_VALUE_KERNELS:  # one map per noise head, its V heads side by side
            batch, _, length, dim = values.shape
            values = values.view(batch, query.shape[1], width, length, dim).permute(0, 1, 3, 2, 4).flatten(3)
            out = attend(self, self.noise, query, key, values, attention_mask, **kwargs)[0]  # (B, T, noise, width·d)
            return out.unflatten(-1, (width, dim)).flatten(2, 3)
        # flash-attention needs equal head dims: each V head gets its own copy of its noise head's query and key
        query, key = query.repeat_interleave(width, 1), key.repeat_interleave(width, 1)
        return attend(self, self.noise, query, key, values, attention_mask, **kwargs)[0]

    def decode_attention(self, query, keys, values, noise_query, attention_mask):
        """out_i = (A1_i − λ_i·A2_n(i))·V_i with the maps combined first: each cached head is read once.

        query (B, H, T, d); keys (B, KV + N, S, d), the cache's signal keys then noise keys; values
        (B, KV, S, d); noise_query (B, N, T, d). One product scores every key head: the signal queries
        packed per KV head, each noise query padded with zero rows to the same height, so the cache's
        key tensor is read as it is (a slice of it would be copied on every step). Returns (B, T, H, d)
        and, with eager attention, the signal maps A1 (as the kernel path does).
        """
        batch, heads, length, dim = query.shape
        kv, noise, span = values.shape[1], noise_query.shape[1], keys.shape[2]
        rows = heads // kv * length
        noise_rows = torch.cat([noise_query, noise_query.new_zeros(batch, noise, rows - length, dim)], 2)
        packed = torch.cat([query.reshape(batch, kv, rows, dim), noise_rows], 1) * self.scaling
        scores = torch.matmul(packed, keys.transpose(2, 3))  # (B, KV + N, rows, S)
        signal = softmax_weights(scores[:, :kv].view(batch, heads, length, span), attention_mask, query.dtype)
        noise_map = softmax_weights(scores[:, kv:, :length], attention_mask, query.dtype)
        lam = self.lambdas().to(query.dtype).reshape(1, noise, -1, 1, 1)  # signal heads of a noise group
        combined = signal.view(batch, noise, -1, length, span) - lam * noise_map.unsqueeze(2)
        output = torch.matmul(combined.view(batch, kv, rows, span), values).view(batch, heads, length, dim)
        return output.transpose(1, 2), signal if self.config._attn_implementation == "eager" else None

    def project_states(self, hidden_states, position_embeddings):
        """The signal queries; the keys the cache holds, signal then noise; the values; the noise queries."""
        query_states, key_states, value_states = project(self, hidden_states, position_embeddings)
        noise_query, noise_key = project(self.noise, hidden_states, position_embeddings, values=False)
        return query_states, torch.cat([key_states, noise_key], 1), value_states, noise_query

    def attention_step(self, query, keys, values, attention_mask, noise_query, **kwargs):
        if (query.shape[2] <= DECODE_QUERY_TOKENS and not self.training
                and self.config._attn_implementation in ("eager", "sdpa")):
            attn_output, attn_weights = self.decode_attention(query, keys, values, noise_query, attention_mask)
        else:
            kv = values.shape[1]
            key_states, noise_key = keys[:, :kv], keys[:, kv:]
            signal, attn_weights = attend(self, self, query, key_states, values, attention_mask, **kwargs)
            noise_values, slots = self.indices(values.device)
            noise_values = values if self.values_in_order else values.index_select(1, noise_values)
            noise = self.noise_attention(noise_query, noise_key, noise_values, attention_mask,
                                         **kwargs).index_select(2, slots)  # (B, T, H, d)
            attn_output = signal - self.lambdas().view(1, 1, -1, 1).to(signal.dtype) * noise
        if self.config.gda_subln:
            attn_output = (1 - self.lambda_init) * self.subln(attn_output)
        return attn_output, attn_weights

    def init_layout_parameters(self) -> None:
        if self.config.gda_lambda == "plain":
            nn.init.zeros_(self.diff_lambda)
            return
        # λ_q2 = λ_q1 and λ_k2 = λ_k1: λ = λ_init exactly, and each factor still gets a gradient
        nn.init.normal_(self.lambda_q1, std=0.1)
        nn.init.normal_(self.lambda_k1, std=0.1)
        with torch.no_grad():
            for copy, original in ((self.lambda_q2, self.lambda_q1), (self.lambda_k2, self.lambda_k1)):
                if not getattr(copy, "_is_hf_initialized", False):  # not loaded from a checkpoint
                    copy.copy_(original)


class GDADecoderLayer(LayoutDecoderLayer):
    attention_class = GDAAttention


class GDAModel(LayoutModel):
    config_class, decoder_layer_class = GDAConfig, GDADecoderLayer


class GDAForCausalLM(LayoutCacheMixin, LayoutForCausalLM):
    # what the conversion added (rehead tune's `trainable: new`): noise heads, λ (either form), the optional sub-norm
    _rehead_new_parameters = (
        r"\.self_attn\.noise\.",
        r"\.self_attn\.diff_lambda$",
        r"\.self_attn\.lambda_[qk][12]$",
        r"\.self_attn\.subln\.",
    )
    model_class = GDAModel


__all__ = ["GDAForCausalLM", "GDAModel"]
