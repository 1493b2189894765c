"""``--to mha``: every query head gets its own K/V head, by repeating the grouped ones (exact)."""

from typing import Literal

from rehead.families.llama import mha_config, repeat_kv_weights

from .options import ConvertOptions
from .rewriter import LayerInput, Rewriter, Rewritten


class MHAOptions(ConvertOptions):
    to: Literal["mha"] = "mha"


class MHARewriter(Rewriter):
    layout = "mha"
    Options = MHAOptions

    def rewrite_layer(self, layer: LayerInput) -> Rewritten:
        return Rewritten(repeat_kv_weights(layer.tensors, self.source_config))

    def target_config(self, plans: list) -> dict:
        return mha_config(self.source_config)
