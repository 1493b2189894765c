"""``--to mha``: every query head gets its own K/V head, by repeating the grouped ones (exact)."""

from typing import Literal

from rehead.families.llama import mha_config, repeat_kv_weights

from .engine import LayerInput, Rewriter
from .options import ConvertOptions


class MHAOptions(ConvertOptions):
    to: Literal["mha"] = "mha"


class MHARewriter(Rewriter):
    layout = "mha"
    Options = MHAOptions

    def rewrite_layer(self, layer: LayerInput):
        return repeat_kv_weights(layer.tensors, self.source_config)

    def target_config(self) -> dict:
        return mha_config(self.source_config)
