"""The static KV cache of a layout whose layers cache their own numbers of key and value heads.

transformers' ``StaticCache`` gives every layer the config's ``num_key_value_heads`` for keys and
values alike (and sizes the value buffer by the key heads it sees). A DHA layer keeps its own
number of key heads and of value heads; a GDA layer caches its noise keys beside its signal keys.
``LayoutCacheMixin`` makes ``generate(cache_implementation="static")`` build a cache whose layer l
holds the key and value heads that decoder layer l's attention caches (its ``cache_heads``), so the
user calls plain ``generate`` and the static cache (and the compiled decode it allows) works for
every layout.

This file travels inside converted checkpoints beside the layout's files: it imports only torch
and transformers.
"""

import torch
from transformers.cache_utils import StaticCache, StaticLayer
from transformers.utils import is_torchdynamo_compiling


class LayoutStaticLayer(StaticLayer):
    """A ``StaticLayer`` of ``key_heads`` key heads and ``value_heads`` value heads of ``head_dim``.

    The head counts are the layer's own, whatever the tensors that first reach it: ``early_initialization``
    passes one shape for keys and values alike.
    """

    def __init__(self, max_cache_len: int, key_heads: int, value_heads: int, head_dim: int, **kwargs):
        super().__init__(max_cache_len, **kwargs)
        self.key_heads, self.value_heads, self.head_dim = key_heads, value_heads, head_dim

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.num_heads, self.k_head_dim, self.v_head_dim = self.key_heads, self.head_dim, self.head_dim
        buffer = dict(dtype=self.dtype, device=self.device)
        self.keys = torch.zeros((self.batch_size, self.key_heads, self.max_cache_len, self.head_dim), **buffer)
        self.values = torch.zeros((self.batch_size, self.value_heads, self.max_cache_len, self.head_dim), **buffer)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not is_torchdynamo_compiling():  # fixed addresses: in-place updates break no compiled graph
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True


class LayoutStaticCache(StaticCache):
    """A ``StaticCache`` with one ``LayoutStaticLayer`` per decoder layer.

    shapes: per decoder layer, (key heads, value heads, head_dim).
    """

    def __init__(self, shapes, max_cache_len: int, offloading: bool = False, offload_only_non_sliding: bool = True):
        layers = [LayoutStaticLayer(max_cache_len, *shape) for shape in shapes]
        super(StaticCache, self).__init__(
            layers=layers, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding
        )


class LayoutCacheMixin:
    """For a layout's ``*ForCausalLM``: ``generate``'s static cache is a ``LayoutStaticCache``.

    Overrides ``GenerationMixin._prepare_static_cache`` (the same signature in transformers 5.17 and
    5.24), which builds the cache for ``cache_implementation="static"`` and ``"offloaded_static"``.
    """

    def static_cache(self, max_cache_len: int, offloading: bool = False) -> LayoutStaticCache:
        """The static cache of this model, for ``max_cache_len`` tokens (to pass to ``generate`` or ``forward``)."""
        shapes = [(*layer.self_attn.cache_heads, layer.self_attn.head_dim) for layer in self.model.layers]
        return LayoutStaticCache(shapes, max_cache_len, offloading=offloading)

    def _prepare_static_cache(self, cache_implementation: str, batch_size: int, max_cache_len: int,
                              prefill_chunk_size, model_kwargs) -> LayoutStaticCache:
        # as transformers does: keep the largest length asked for so far, so a compiled decode is reused
        length = max(max_cache_len, getattr(self, "_previous_max_cache_length", -1))
        cache = self.static_cache(length, offloading="offloaded" in cache_implementation)
        if prefill_chunk_size is not None:  # a compiled chunked prefill needs the buffers before it runs
            cache.early_initialization(batch_size, 1, 1, self.dtype, self.device)  # each layer knows its shape
        self._previous_max_cache_length = length
        return cache
