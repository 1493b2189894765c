"""Configuration of the DHA layout (Chen et al. 2024, "DHA: Decoupled-Head Attention via Adaptive Heads Fusion").

This file travels inside converted checkpoints: it imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class DHAConfig(LlamaConfig):
    r"""A LLaMA configuration whose key heads and value heads are fused separately, per layer.

    key_heads_per_layer / value_heads_per_layer: how many K and V heads each layer keeps
        (the KV cache holds only these).
    key_head_of_query / value_head_of_query: per layer, for every query head, the K (V) head it reads.
    dha_query_scale: each query head multiplies every RoPE pair of its normalised query by a complex
        scale (``self_attn.q_pair_scale``, (heads, head_dim): the real parts, then the imaginary
        parts), where a fused key head's fit is folded into the queries of a source with q/k norms
        (Qwen3), whose q_proj cannot hold it.
    """

    model_type = "rehead_dha"

    qk_norm: bool = False  # the source's per-head q/k norms before RoPE (Qwen3)
    key_heads_per_layer: list | None = None
    value_heads_per_layer: list | None = None
    key_head_of_query: list | None = None
    value_head_of_query: list | None = None
    dha_query_scale: bool = False

    # what rehead's inspect and model card say about the layout
    layout_summary = ("decoupled-head attention (DHA, Chen et al. 2024): similar key heads and similar value heads "
                      "fused, separately and per layer")

    def kv_heads_per_layer(self) -> tuple[list[int], list[int]]:
        return list(self.key_heads_per_layer), list(self.value_heads_per_layer)

    def layout_facts(self, read=None) -> dict:
        return {"key_head_of_query": self.key_head_of_query, "value_head_of_query": self.value_head_of_query}

    def card_lines(self) -> list[str]:
        return []

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        heads, layers = self.num_attention_heads, self.num_hidden_layers
        group = heads // self.num_key_value_heads
        if self.key_heads_per_layer is None:
            self.key_heads_per_layer = [self.num_key_value_heads] * layers
        if self.value_heads_per_layer is None:
            self.value_heads_per_layer = [self.num_key_value_heads] * layers
        if self.key_head_of_query is None:
            self.key_head_of_query = [[i // group for i in range(heads)] for _ in range(layers)]
        if self.value_head_of_query is None:
            self.value_head_of_query = [[i // group for i in range(heads)] for _ in range(layers)]

    def validate_architecture(self):
        super().validate_architecture()
        layers, heads = self.num_hidden_layers, self.num_attention_heads
        for kind in ("key", "value"):
            counts, maps = getattr(self, f"{kind}_heads_per_layer"), getattr(self, f"{kind}_head_of_query")
            if len(counts) != layers or len(maps) != layers:
                raise ValueError(f"{kind}_heads_per_layer and {kind}_head_of_query need one entry per layer ({layers})")
            for layer, (count, reads) in enumerate(zip(counts, maps)):
                if len(reads) != heads or sorted(set(reads)) != list(range(count)):
                    raise ValueError(
                        f"{kind}_head_of_query[{layer}] = {reads}: must give each of the {heads} query heads one of "
                        f"the layer's {count} {kind} heads, using every one"
                    )
