"""Mistral: LLaMA blocks, with a sliding window that rehead's layouts do not hold."""

from rehead.errors import ReheadError

from .llama import Llama


class Mistral(Llama):
    model_type = "mistral"
    title = "Mistral"
    limits = "without a sliding window"

    def check(self, config: dict, where: str) -> None:
        if config.get("sliding_window") is not None:
            raise ReheadError(
                f"{where}: Mistral with sliding_window={config['sliding_window']} is not supported "
                "(the converted layouts attend to the full context); use a checkpoint without a sliding window"
            )
        super().check(config, where)

    def llama_values(self, config: dict) -> dict:
        values = super().llama_values(config)
        values.pop("sliding_window", None)
        return values
