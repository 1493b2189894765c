"""Layer-local refinement after a closed-form fit: Adam steps on some of a converted attention's
parameters so that its output matches the source layer's attention output on the calibration text,
one calibration micro-batch a step. The result is kept only if the error over all the calibration
text went down. DHA and MLA use it (``--refine-steps``, ``--refine-lr``)."""

from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from .options import ConvertOptions
from .rewriter import LayerInput


class RefineOptions(ConvertOptions):
    """The refinement's flags, shared by the layouts that refine (DHA, MLA)."""

    refine_steps: int = Field(30, ge=0, description="layer-local refinement steps after the closed form, fitted to "
                                                    "the source layer's attention output on the calibration text "
                                                    "(DHA: on the layers that fuse heads; MLA: q_proj, kv_b_proj and "
                                                    "o_proj of every layer; 0: the closed form alone)")
    refine_lr: float = Field(1e-4, gt=0, description="learning rate of the refinement")


def refine_attention(attn: nn.Module, layer: LayerInput, trainable: tuple[str, ...], steps: int, lr: float,
                     embeddings: Callable = lambda pe: pe) -> tuple[bool, dict]:
    """Refines ``attn`` in place (its parameters whose first name part is in ``trainable``); the caller's
    tensors must not be its parameters (Adam steps in place). ``embeddings`` maps the source's rotary
    (cos, sin) to the converted attention's. Returns whether the refined parameters are to be kept (the
    error went down; ``attn`` holds them either way) and the record: the error before and after, relative
    to the target's energy."""
    source, calib = layer.source_layer, layer.calibration
    cos, sin = calib.position_embeddings
    with torch.no_grad():
        inputs = [source.input_layernorm(h) for h in calib.hidden.split(calib.micro_batch)]
        targets = [source.self_attn(x, position_embeddings=(cos[: len(x)], sin[: len(x)]), attention_mask=None)[0]
                   for x in inputs]
    scale = sum(t.pow(2).sum() for t in targets) / sum(t.numel() for t in targets)

    def loss(x, target):
        rotary = embeddings((cos[: len(x)], sin[: len(x)]))
        return (attn(x, position_embeddings=rotary, attention_mask=None)[0] - target).pow(2).mean() / scale

    def total() -> float:
        with torch.no_grad():
            return sum(loss(x, t).item() * len(x) for x, t in zip(inputs, targets)) / len(calib.hidden)

    before = total()
    record = {"layer": layer.index, "error_before": round(before, 6), "error_after": round(before, 6)}
    if before <= 1e-10:  # the closed form is already exact: nothing to refine
        return False, record
    params = [p for name, p in attn.named_parameters() if name.split(".")[0] in trainable]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        loss(inputs[step % len(inputs)], targets[step % len(inputs)]).backward()
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
    after = total()
    return after < before, {**record, "error_after": round(after, 6)}
