"""DHA's planning: what fusing a layer's heads costs, measured on a probe of the source's own
activations, and the global budget spent where it costs least.

Each layer's fit-error curve for keeping 1 … KV key heads and 1 … KV value heads (groups merged
cheapest first) is priced at the layer's attention output or, with ``--allocation logits``, by its
effect on the final logits (the Fisher-weighted error, convert/sensitivity.py); the budget then
goes, one head at a time, to the layer and kind (K or V) whose next merge would cost the most.
"""

import heapq
from dataclasses import dataclass, field

import torch

from .dha_assembly import Assembly
from .dha_fusion import LayerFusion, agglomerate
from .rewriter import LayerInput

HEATMAP_LAYERS = 3
PROBE_SEQUENCES = 4  # calibration sequences on which the planning pass measures attention errors


def allocate(curves: dict, target: int, start: int) -> dict:
    """Removes heads one at a time where the next merge costs least until ``target`` heads remain.

    curves[(layer, kind)][n] is the fit error with n heads; every entry starts at ``start`` heads.
    """
    counts = {key: start for key in curves}
    heap = [(curve[start - 1] - curve[start], key) for key, curve in curves.items() if start > 1]
    heapq.heapify(heap)
    remaining = start * len(curves)
    while remaining > target:
        _, key = heapq.heappop(heap)
        counts[key] -= 1
        remaining -= 1
        n = counts[key]
        if n > 1:
            heapq.heappush(heap, (curves[key][n - 1] - curves[key][n], key))
    return counts


@dataclass
class Probe:
    """A few calibration sequences at a layer's attention input, and the source attention's output on them."""

    x: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    target: torch.Tensor
    scale: float

    @classmethod
    def of(cls, layer: LayerInput) -> "Probe":
        calib, source = layer.calibration, layer.source_layer
        hidden = calib.hidden[:PROBE_SEQUENCES]
        cos, sin = (t[: len(hidden)] for t in calib.position_embeddings)
        with torch.no_grad():
            x = source.input_layernorm(hidden)
            target = source.self_attn(x, position_embeddings=(cos, sin))[0]
        return cls(x, (cos, sin), target, hidden.pow(2).mean().item())

    @torch.no_grad()
    def error(self, attention: torch.nn.Module, sensitivity: torch.Tensor | None = None) -> float:
        """``attention``'s squared error on the probe, relative to the residual stream's energy; with the
        layer's ``sensitivity`` (``--allocation logits``), its Fisher-weighted error ½ Σ G ⊙ e² per token."""
        out = attention(self.x, position_embeddings=self.position_embeddings)[0]
        error = (out - self.target).pow(2)
        if sensitivity is None:
            return error.mean().item() / self.scale
        return 0.5 * (sensitivity * error).sum().item() / error[..., 0].numel()


@dataclass
class LayerCurves:
    """What the planning pass measured in one layer: the error curve of each kind ("k", "v", or "kv"
    for shared groups), curves[kind][count], and for a few layers the pairwise merge errors (dha_plan.png)."""

    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    pair_merge_error: dict | None = None


def probe_error(assembly: Assembly, probe: Probe, layer: LayerInput, fusion: LayerFusion, key_groups, value_groups,
                mean: bool = False, permute: bool = False) -> float:
    """The probe's error with the layer's K and V heads fused into these groups."""
    tensors, grouping = assembly.assemble(fusion, key_groups, value_groups, mean, permute)
    return probe.error(assembly.attention(layer.index, tensors, grouping), layer.sensitivity)


def pair_merge_error(layer: int, layers: int, fusion: LayerFusion) -> dict | None:
    """The pairwise merge errors of a few layers (the first, the middle and the last), else None."""
    if layer not in sorted({0, layers // 2, layers - 1})[:HEATMAP_LAYERS]:
        return None
    kv = fusion.kv
    return {
        kind: [[0.0 if a == b else error((min(a, b), max(a, b))) / max(energy((a, b)), 1e-30)
                for b in range(kv)] for a in range(kv)]
        for kind, error, energy in (("k", fusion.key_error, fusion.key_energy),
                                    ("v", fusion.value_error, fusion.value_energy))
    }


def decoupled_curves(assembly: Assembly, layer: LayerInput) -> LayerCurves:
    """The layer's error curve for 1 … KV key heads and 1 … KV value heads, the other kind unfused."""
    fusion = assembly.fusion(layer)
    probe = Probe.of(layer)
    kv = assembly.kv
    singletons = [(j,) for j in range(kv)]
    measured = LayerCurves(pair_merge_error=pair_merge_error(layer.index, assembly.llama.num_hidden_layers, fusion))
    for kind, error in (("k", fusion.key_error), ("v", fusion.value_error)):
        history = agglomerate(kv, error, 1)
        curve = {kv: 0.0}
        for count in range(kv - 1, 0, -1):
            groups = (history[count], singletons) if kind == "k" else (singletons, history[count])
            curve[count] = probe_error(assembly, probe, layer, fusion, *groups)
        measured.curves[kind] = curve
    return measured


def shared_curves(assembly: Assembly, layer: LayerInput, counts: list[int], mean: bool) -> LayerCurves:
    """The layer's error curve over these KV head counts, K and V sharing equal groups (query heads permuted)."""
    fusion = assembly.fusion(layer)
    probe = Probe.of(layer)
    curve = {assembly.kv: 0.0}
    for count in counts:
        groups = assembly.shared_groups(fusion, count, mean)
        curve[count] = probe_error(assembly, probe, layer, fusion, groups, groups, mean, permute=True)
    return LayerCurves({"kv": curve}, pair_merge_error(layer.index, assembly.llama.num_hidden_layers, fusion))
