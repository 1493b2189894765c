"""Training data: which packed blocks each step reads, in an order fixed by the seed.

The blocks come from rehead.text (mixtures and packing: ``text.pack``, ``text.stream``). The batch
of step ``s`` is a pure function of (seed, s), whatever the number of processes: global sample
``i`` is block ``perm_e[i mod n]`` of epoch ``e = i // n``, each epoch with its own seeded
permutation. Resuming at step ``s`` therefore needs no saved data position beyond ``s``, and N
processes at a global batch of B see exactly the blocks one process sees at B. A mixture's blocks
(``data.train: {shakespeare: 1, pydoc: 1, self: 1}``; ``self`` is text sampled from the teacher)
are permuted together, so the order stays a pure function of (seed, s).

With ``data.streaming`` the blocks are packed on the fly (``text.stream``); each process takes every
N-th block, and a resumed run skips the blocks already consumed.
"""

from collections.abc import Iterator

import torch

from rehead import text


class PackedBlocks:
    """Blocks held in memory; ``batch(step, rank)`` gives a process its share of a step's global batch."""

    def __init__(self, blocks: torch.Tensor, seed: int, micro_batch: int, grad_accum: int, world: int):
        self.blocks = blocks
        self.seed = seed
        self.micro_batch, self.grad_accum, self.world = micro_batch, grad_accum, world
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=generator)}
        return self._perms[epoch]

    def sample(self, index: int) -> torch.Tensor:
        epoch, position = divmod(index, len(self.blocks))
        return self.blocks[self._perm(epoch)[position]]

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        """The ``grad_accum`` micro-batches (micro_batch, seq_len) of process ``rank`` at ``step`` (0-based)."""
        first = step * self.per_step
        out = []
        for accum in range(self.grad_accum):
            start = first + (accum * self.world + rank) * self.micro_batch
            out.append(torch.stack([self.sample(i) for i in range(start, start + self.micro_batch)]))
        return out


class StreamedBlocks:
    """Blocks packed on the fly; the same interface as :class:`PackedBlocks` for consecutive steps."""

    def __init__(self, tokenizer, spec, seq_len: int, seed: int, buffer: int, micro_batch: int,
                 grad_accum: int, world: int, sampler=None):
        self.tokenizer, self.spec, self.seq_len = tokenizer, spec, seq_len
        self.seed, self.buffer, self.sampler = seed, buffer, sampler
        self.micro_batch, self.grad_accum, self.world = micro_batch, grad_accum, world
        self._stream: Iterator[torch.Tensor] | None = None
        self._next_step = 0

    @property
    def per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        if self._stream is None or step != self._next_step:
            if self._stream is not None and step < self._next_step:
                raise ValueError("a streamed data set is read forwards only")
            if self._stream is None:
                self._stream = text.stream(self.tokenizer, self.spec, self.seq_len, self.seed, self.buffer,
                                           self.sampler)
                self._next_step = 0
            for _ in range((step - self._next_step) * self.per_step):  # skip what earlier steps consumed
                next(self._stream)
        step_blocks = [next(self._stream) for _ in range(self.per_step)]
        self._next_step = step + 1
        out = []
        for accum in range(self.grad_accum):
            start = (accum * self.world + rank) * self.micro_batch
            out.append(torch.stack(step_blocks[start : start + self.micro_batch]))
        return out
