"""The training objective: language modelling, distillation from the teacher, and the layout's own terms.

The vocabulary-sized part (logits, softmaxes, KL) is computed over chunks of tokens, each chunk
under activation checkpointing: at no time do float32 logits of more than one chunk exist, in the
forward or the backward, whatever the vocabulary and the batch (Llama-3's 128k vocabulary at
8 x 8192 tokens would otherwise need 34 GB for one float32 copy of the logits).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft (LoRA) wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_terms(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, teacher_head: nn.Module | None,
                 teacher_hidden: torch.Tensor | None, temperature: float, want_kd: bool) -> torch.Tensor:
    logits = head(hidden).float()
    lm = F.cross_entropy(logits, labels, reduction="sum")
    if not want_kd:
        return torch.stack([lm, lm.new_zeros(())])
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)
    student_logp = F.log_softmax(logits / temperature, dim=-1)
    # KL(teacher || student), scaled by T² so that its gradients keep their size across temperatures
    kd = (teacher_logp.exp() * (teacher_logp - student_logp)).sum() * temperature**2
    return torch.stack([lm, kd])


class Objective(nn.Module):
    """Wraps the student (and holds the teacher outside its parameters) so that one ``forward`` returns
    the whole loss: what DDP and FSDP wrap, and what ``accelerate`` prepares."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, lm: float, kd: float, temperature: float,
                 layout: float, chunk_tokens: int):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a submodule, so not trained, saved or wrapped
        self.lm, self.kd, self.temperature, self.layout = lm, kd, temperature, layout
        self.chunk_tokens = chunk_tokens
        self._no_split_modules = getattr(student, "_no_split_modules", None)  # FSDP's auto-wrap policy reads it

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    @staticmethod
    def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the decoder stack, the LM head) of a causal LM, through a peft wrapper if there is one."""
        base = unwrapped(model)
        return base.get_decoder(), base.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums over the predicted tokens of the block: {"lm", "kd", "layout" (means), "loss", "tokens"}."""
        decoder, head = self._parts(self.student)
        base = unwrapped(self.student)
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        labels = input_ids[:, 1:].flatten()
        want_kd = self.kd > 0 and self.teacher is not None
        teacher_hidden = teacher_head = None
        if want_kd:
            teacher_decoder, teacher_head = self._parts(self.teacher)
            with torch.no_grad():
                teacher_hidden = teacher_decoder(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        totals = hidden.new_zeros(2, dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            stop = start + self.chunk_tokens
            t_hidden = teacher_hidden[start:stop] if want_kd else None
            args = (head, hidden[start:stop], labels[start:stop], teacher_head, t_hidden, self.temperature, want_kd)
            if torch.is_grad_enabled():
                totals = totals + checkpoint(_chunk_terms, *args, use_reentrant=False)
            else:
                totals = totals + _chunk_terms(*args)
        tokens = labels.numel()
        lm, kd = totals[0] / tokens, totals[1] / tokens
        extra = base.layout_loss() if hasattr(base, "layout_loss") else None  # the layout's terms of this forward
        layout = extra if extra is not None else lm.new_zeros(())
        loss = self.lm * lm + self.kd * kd + self.layout * layout
        return {"loss": loss, "lm": lm.detach(), "kd": kd.detach(), "layout": layout.detach(),
                "tokens": torch.tensor(tokens, device=lm.device)}
