"""``--to mha``: every query head gets its own K/V head, by repeating the grouped ones (exact)."""

from rehead.heads import mha_config, repeat_kv_weights

from .engine import LayerInput, Rewriter


class MHARewriter(Rewriter):
    layout = "mha"

    def rewrite_layer(self, layer: LayerInput):
        return repeat_kv_weights(layer.tensors, self.source_config)

    def target_config(self) -> dict:
        return mha_config(self.source_config)
