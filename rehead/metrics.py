"""Held-out perplexity: the exponential of the mean next-token loss over fixed token blocks."""

import math

import torch


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on ``blocks`` (n, seq_len); every block is scored on its own."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
