"""The LLaMA decoder stack around a layout's own decoder layer.

This file travels inside converted checkpoints beside the layout's files: it imports only torch
and transformers.
"""

from torch import nn
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding


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
