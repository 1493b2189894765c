"""Configuration of DeciLM (``nemotron-nas``): the LLaMA decoder with its own KV head count and FFN
width in every layer, the format of NVIDIA's Llama-Nemotron NAS models.

vLLM (``vllm/model_executor/models/nemotron_nas.py``) and llama.cpp (the ``deci`` architecture)
serve it natively, so a DHA conversion whose layers are plain grouped-query attention ships in it
(``rehead convert --to dha --export deci``). ``block_configs`` holds one entry per layer:
``attention.n_heads_in_group`` (query heads per KV head) and ``ffn.ffn_mult``, from which both
servers compute the FFN width with the same formula (``ffn_mult_to_intermediate_size``).

This file travels inside converted checkpoints: it imports only transformers.
"""

from dataclasses import asdict, dataclass, fields

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width vLLM (``nemotron_nas._ffn_mult_to_intermediate_size``) and llama.cpp
    (``DeciModel._ffn_mult_to_intermediate_size``) give ``ffn_mult``: ⌊2·ffn_mult·hidden/3⌋,
    rounded up to a multiple of 256."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // 256) * 256


@dataclass(frozen=True)
class AttentionConfig:
    n_heads_in_group: int  # query heads per KV head: the layer keeps num_attention_heads / n_heads_in_group
    no_op: bool = False
    replace_with_linear: bool = False


@dataclass(frozen=True)
class FFNConfig:
    ffn_mult: float
    no_op: bool = False
    replace_with_linear: bool = False


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, values: dict, layer: int) -> "BlockConfig":
        """A block_configs entry; keys this model does not implement must hold their neutral value
        (NAS models also use no-op and linear blocks, which only their own modeling code runs)."""
        parts = {}
        for name, part in (("attention", AttentionConfig), ("ffn", FFNConfig)):
            given = dict(values.get(name) or {})
            known = {f.name for f in fields(part)}
            unsupported = {k: v for k, v in given.items() if k not in known and v not in (None, False)}
            unsupported.update({k: given[k] for k in ("no_op", "replace_with_linear") if given.get(k)})
            required = "n_heads_in_group" if name == "attention" else "ffn_mult"
            if given.get(required) is None:
                unsupported[required] = None
            if unsupported:
                raise ValueError(
                    f"block_configs[{layer}].{name} has {unsupported}: this DeciLM implementation holds attention "
                    "and FFN blocks with n_heads_in_group and ffn_mult only; load a NAS model with no-op, linear or "
                    "sparse blocks with its own code (trust_remote_code=True)"
                )
            parts[name] = part(**{k: v for k, v in given.items() if k in known})
        return cls(**parts)


@strict
class DeciLMConfig(LlamaConfig):
    r"""A LLaMA configuration with a KV head count and an FFN width per layer (``block_configs``).

    block_configs: one entry per layer, {"attention": {"n_heads_in_group": g, ...}, "ffn": {"ffn_mult": m, ...}}.
        Without it every layer takes num_key_value_heads and intermediate_size.

    The per-layer values are the truth: config.json carries neither num_key_value_heads nor
    intermediate_size, and in Python both hold the widest layer's value.
    """

    model_type = "nemotron-nas"

    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.block_configs is None:
            group = self.num_attention_heads // self.num_key_value_heads
            ffn_mult = 1.5 * self.intermediate_size / self.hidden_size
            self.block_configs = [{"attention": {"n_heads_in_group": group}, "ffn": {"ffn_mult": ffn_mult}}
                                  for _ in range(self.num_hidden_layers)]
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b, layer)
                              for layer, b in enumerate(self.block_configs)]
        self.num_key_value_heads = max(self.heads_kv_per_layer)
        self.intermediate_size = max(self.intermediate_size_per_layer)

    # what rehead's inspect and model card say about the format
    layout_summary = ("decoupled-head attention (DHA, Chen et al. 2024) in the DeciLM (`nemotron-nas`) format: a KV "
                      "head count of its own in every layer, K and V grouped alike, which vLLM and llama.cpp serve "
                      "natively")

    def kv_heads_per_layer(self) -> tuple[list[int], list[int]]:
        return list(self.heads_kv_per_layer), list(self.heads_kv_per_layer)

    def layout_facts(self, read=None) -> dict:
        return {"n_heads_in_group": [b.attention.n_heads_in_group for b in self.block_configs]}

    def card_lines(self) -> list[str]:
        return ["- Serves natively in vLLM (`nemotron_nas`) and llama.cpp (`deci`) with these per-layer KV heads"]

    @property
    def heads_kv_per_layer(self) -> list[int]:
        """Each layer's KV heads, from its n_heads_in_group."""
        return [self.num_attention_heads // b.attention.n_heads_in_group for b in self.block_configs]

    @property
    def intermediate_size_per_layer(self) -> list[int]:
        return [ffn_mult_to_intermediate_size(b.ffn.ffn_mult, self.hidden_size) for b in self.block_configs]

    def validate_architecture(self):
        super().validate_architecture()
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries for {self.num_hidden_layers} layers: "
                "give one per layer"
            )
        for layer, block in enumerate(self.block_configs):
            group = block.attention.n_heads_in_group
            if not isinstance(group, int) or group < 1 or self.num_attention_heads % group:
                raise ValueError(
                    f"block_configs[{layer}].attention.n_heads_in_group = {group!r}: must divide the "
                    f"{self.num_attention_heads} query heads"
                )

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["block_configs"] = [asdict(block) for block in self.block_configs]
        for key in ("num_key_value_heads", "intermediate_size"):  # per layer, in block_configs
            output.pop(key, None)
        return output


__all__ = ["DeciLMConfig"]
