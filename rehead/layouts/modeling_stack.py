"""The LLaMA decoder stack around a layout's own decoder layer.

This file travels inside converted checkpoints beside the layout's files: it imports only torch
and transformers.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


def init_stack(model, config, layer_class) -> None:
    """LlamaModel.__init__ with ``layer_class`` layers (LlamaModel's own would build Llama layers first)."""
    LlamaPreTrainedModel.__init__(model, config)
    model.padding_idx = config.pad_token_id
    model.vocab_size = config.vocab_size
    model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, model.padding_idx)
    model.layers = nn.ModuleList([layer_class(config, i) for i in range(config.num_hidden_layers)])
    model.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    model.rotary_emb = LlamaRotaryEmbedding(config=config)
    model.gradient_checkpointing = False
    model.post_init()


def init_causal_lm(model, config, model_class) -> None:
    """LlamaForCausalLM.__init__ around a ``model_class`` stack."""
    LlamaPreTrainedModel.__init__(model, config)
    model.model = model_class(config)
    model.vocab_size = config.vocab_size
    model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    model.post_init()


def project(module, hidden_states: torch.Tensor, position_embeddings, values: bool = True) -> list[torch.Tensor]:
    """``module``'s queries, keys (rotated by RoPE) and values, each (batch, heads, seq, head_dim)."""
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    names = ("q_proj", "k_proj", "v_proj") if values else ("q_proj", "k_proj")
    states = [getattr(module, name)(hidden_states).view(shape).transpose(1, 2) for name in names]
    cos, sin = position_embeddings
    states[0], states[1] = apply_rotary_pos_emb(states[0], states[1], cos, sin)
    return states


def softmax_weights(scores: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """softmax over the keys of ``scores`` (B, heads, T, S), which it masks in place, as the attention
    kernels do with the mask they are given: additive float (eager), boolean with True where a query
    attends (sdpa), or None (sdpa's is_causal: query t sees keys 0..t, a prefill). In float32, returned in ``dtype``."""
    length, span = scores.shape[-2:]
    if attention_mask is None and length > 1:
        attention_mask = torch.ones(length, span, dtype=torch.bool, device=scores.device).tril()
    if attention_mask is not None:
        attention_mask = attention_mask[..., :span]
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(attention_mask)
    return scores.softmax(-1, dtype=torch.float32).to(dtype)


def attend(attention, module, query, key, value, attention_mask, **kwargs):
    """The configured attention kernel (eager, sdpa, flash when installed) over ``module``'s heads;
    returns the output as (batch, seq, heads, value_dim) and the weights (eager only)."""
    interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    dropout = 0.0 if not attention.training else attention.attention_dropout
    return interface(module, query, key, value, attention_mask, dropout=dropout, scaling=attention.scaling, **kwargs)
