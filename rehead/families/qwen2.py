"""Qwen2: a LLaMA block with biases on q/k/v and none on o_proj, which becomes a zero bias in the LLaMA form
(rehead.families.llama.with_o_proj_bias)."""

from rehead.errors import ReheadError

from .llama import Llama

SLIDING = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


class Qwen2(Llama):
    model_type = "qwen2"
    title = "Qwen2, Qwen2.5"
    limits = "q/k/v biases; without use_sliding_window"

    def check(self, config: dict, where: str) -> None:
        if config.get("use_sliding_window"):
            raise ReheadError(f"{where}: Qwen2 with use_sliding_window=true is not supported")
        super().check(config, where)

    def llama_values(self, config: dict) -> dict:
        values = {k: v for k, v in super().llama_values(config).items() if k not in SLIDING}
        return {**values, "attention_bias": True}
