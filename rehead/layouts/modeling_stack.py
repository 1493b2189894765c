"""What every layout's transformers model shares: the attention's sequence around the layout's own
step, and the LLaMA decoder layer, decoder stack and causal LM around that attention.

    project → cache → the layout's attention step → o_proj

A layout's modeling file subclasses ``LayoutAttention`` (its attention step, and what it projects
where that is more than LLaMA's queries, keys and values) and names its classes in the shells:
``LayoutDecoderLayer.attention_class``, ``LayoutModel.decoder_layer_class``, ``LayoutForCausalLM.model_class``.

This file travels inside converted checkpoints beside the layout's files: it imports only torch
and transformers.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


def project(module, hidden_states: torch.Tensor, position_embeddings, values: bool = True,
            raw_queries: list | None = None) -> list[torch.Tensor]:
    """``module``'s queries, keys (rotated by RoPE) and values, each (batch, heads, seq, head_dim).

    A module with ``q_norm`` and ``k_norm`` (a source with per-head q/k norms, Qwen3) normalises each
    head's query and key over head_dim before RoPE, as Qwen3Attention does. ``raw_queries``, a list,
    receives the queries as q_proj gives them, before any norm or RoPE (B, T, H, d).
    """
    shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    names = ("q_proj", "k_proj", "v_proj") if values else ("q_proj", "k_proj")
    states = [getattr(module, name)(hidden_states).view(shape) for name in names]
    if raw_queries is not None:
        raw_queries.append(states[0])
    if getattr(module, "q_norm", None) is not None:
        states[0], states[1] = module.q_norm(states[0]), module.k_norm(states[1])
    states = [state.transpose(1, 2) for state in states]
    cos, sin = position_embeddings
    states[0], states[1] = apply_rotary_pos_emb(states[0], states[1], cos, sin)
    return states


def head_norms(config, module: nn.Module) -> None:
    """Gives ``module`` Qwen3's per-head q/k norms (an RMSNorm over head_dim, weights shared by the
    heads) where ``config.qk_norm`` says the source had them; ``project`` applies them."""
    if getattr(config, "qk_norm", False):
        module.q_norm = LlamaRMSNorm(module.head_dim, eps=config.rms_norm_eps)
        module.k_norm = LlamaRMSNorm(module.head_dim, eps=config.rms_norm_eps)


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


class LayoutAttention(LlamaAttention):
    """LLaMA's attention with the layout's own step between the cache and ``o_proj``; with
    ``config.qk_norm``, the per-head q/k norms of Qwen3's attention before RoPE (``head_norms``).

    A layout overrides ``attention_step`` and, where the cache holds more than the rotated keys and the
    values or its step needs more than the queries, ``project_states``; ``init_layout_parameters`` starts
    what it adds to LLaMA's attention. ``index_maps`` (lists of head indices) reach the step as index
    tensors through ``indices``, made once per device.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        head_norms(config, self)
        self.index_maps: tuple[list[int], ...] = ()
        self._index = {}

    def indices(self, device: torch.device) -> list[torch.Tensor]:
        """``index_maps`` as index tensors on ``device``."""
        if device not in self._index:
            self._index[device] = [torch.tensor(m, dtype=torch.long, device=device) for m in self.index_maps]
        return self._index[device]

    def project_states(self, hidden_states: torch.Tensor, position_embeddings) -> tuple:
        """The queries, the keys and values the cache holds, and what the attention step needs besides
        (here nothing: LLaMA's projections)."""
        return (*project(self, hidden_states, position_embeddings), None)

    def attention_step(self, query, key, value, attention_mask, extra, **kwargs):
        """The heads' outputs (B, T, H, d) and, with eager attention, the weights; ``key`` and ``value``
        are what the cache holds, ``extra`` what ``project_states`` gave besides. Here: the attention kernel."""
        return attend(self, self, query, key, value, attention_mask, **kwargs)

    def init_layout_parameters(self) -> None:
        """Initialises what the layout adds to LLaMA's attention (called by the model's weight init)."""

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
        query, key, value, extra = self.project_states(hidden_states, position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attn_output, attn_weights = self.attention_step(query, key, value, attention_mask, extra, **kwargs)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class LayoutDecoderLayer(LlamaDecoderLayer):
    """LLaMA's decoder layer, built at the sizes ``layer_sizes`` gives it, around the layout's
    ``attention_class`` (LLaMA's own attention where it names none)."""

    attention_class: type | None = None

    def __init__(self, config, layer_idx: int):
        super().__init__(self.layer_sizes(config, layer_idx), layer_idx)
        if self.attention_class is not None:
            self.self_attn = self.attention_class(config, layer_idx)
        # the modules keep the model's config, so that switching the attention implementation reaches them
        self.self_attn.config = self.mlp.config = config

    @staticmethod
    def layer_sizes(config, layer_idx: int):
        """The config this layer's LLaMA modules are built at: the model's, unless a format sizes layers one by one."""
        return config


class SourceDecoderLayer(LayoutDecoderLayer):
    """A source's decoder layer in the LLaMA form: LLaMA's, with the per-head q/k norms where
    ``config.qk_norm`` (Qwen3's layer, which the conversion engine runs on calibration text)."""

    attention_class = LayoutAttention


class LayoutPreTrainedModel(LlamaPreTrainedModel):
    """LlamaPreTrainedModel whose weight init also starts what a layout adds to its attention."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LayoutAttention):
            module.init_layout_parameters()


class LayoutModel(LayoutPreTrainedModel, LlamaModel):
    """LlamaModel of ``decoder_layer_class`` layers, which device maps keep whole."""

    decoder_layer_class: type

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._no_split_modules = [cls.decoder_layer_class.__name__]

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)  # LlamaModel.__init__ would build LLaMA layers first
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class LayoutForCausalLM(LayoutPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    """LlamaForCausalLM around a ``model_class`` stack, whose config class it takes."""

    model_class: type

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.config_class = cls.model_class.config_class
        cls._no_split_modules = cls.model_class._no_split_modules

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
