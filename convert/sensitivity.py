"""How much the model's output cares about each layer's attention output: the diagonal of the Fisher
information of the next-token distributions with respect to it, on a few calibration sequences.

For a small change e of layer l's attention output a_l (the output of o_proj), the KL divergence of
the final next-token distributions from the source's is, to second order,

    Σ_t KL(p_t ‖ p'_t) ≈ ½ eᵀ F_l e,    F_l = Σ_t E_{y ~ p_t} [g_t gᵀ_t],   g_t = ∂ log p_t(y) / ∂ a_l.

One backward pass of Σ_t log p_t(y_t), each y_t drawn from the source's own p_t, estimates the
diagonal of every layer's F_l at once without bias (the cross terms between positions have zero
mean): G_l = (∂ Σ_t log p_t(y_t) / ∂ a_l)², per token and channel. A rewrite of layer l that
changes its attention output by e then costs ½ Σ G_l ⊙ e² nats, summed over the probe's tokens.

Streamed like the conversion: a forward pass keeps each layer's input on the probe, then a backward
pass rebuilds one layer at a time from its tensors. Memory: one layer, and two probe activations
per layer.
"""

from collections.abc import Callable

import torch
from torch import nn

LOGIT_CHUNK = 512  # tokens whose vocabulary-sized logits are held at once


def attention_fisher(layer: Callable[[int], nn.Module], n_layers: int, hidden: torch.Tensor, position_embeddings,
                     final_norm: nn.Module, head: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """G_l (sequences, seq_len, hidden) for every layer l on the probe ``hidden`` (the first layer's inputs);
    ``layer(l)`` builds source layer l, ``final_norm`` and ``head`` (vocabulary × hidden) make the logits."""
    inputs = []
    with torch.no_grad():
        for index in range(n_layers):
            inputs.append(hidden)
            hidden = layer(index)(hidden, attention_mask=None, position_embeddings=position_embeddings)
    grad = _output_gradient(hidden, final_norm, head, seed)
    fisher = [torch.empty(0)] * n_layers
    for index in reversed(range(n_layers)):
        module = layer(index)
        x = inputs.pop().requires_grad_(True)
        kept = {}

        def keep(_, args, output):
            output.retain_grad()
            kept["attention"] = output

        handle = module.self_attn.o_proj.register_forward_hook(keep)
        module(x, attention_mask=None, position_embeddings=position_embeddings).backward(grad)
        handle.remove()
        fisher[index] = kept["attention"].grad.detach().pow(2)
        grad = x.grad.detach()
    return fisher


def _output_gradient(hidden: torch.Tensor, final_norm: nn.Module, head: torch.Tensor, seed: int) -> torch.Tensor:
    """∂ Σ_t log p_t(y_t) / ∂ (the last layer's output), y_t drawn from p_t."""
    generator = torch.Generator(hidden.device).manual_seed(seed)
    h = hidden.detach().requires_grad_(True)
    normed = final_norm(h)
    x = normed.detach().flatten(0, 1).requires_grad_(True)
    for chunk in x.split(LOGIT_CHUNK):
        log_p = torch.log_softmax(chunk @ head.T, dim=-1)
        drawn = torch.multinomial(log_p.detach().exp(), 1, generator=generator)
        log_p.gather(1, drawn).sum().backward()
    normed.backward(x.grad.view_as(normed))
    return h.grad.detach()
