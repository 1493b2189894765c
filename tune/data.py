"""Training data: text tokenized and packed into fixed blocks, in an order fixed by the seed.

The batch of step ``s`` is a pure function of (seed, s), whatever the number of processes:
global sample ``i`` is block ``perm_e[i mod n]`` of epoch ``e = i // n``, each epoch with its own
seeded permutation. Resuming at step ``s`` therefore needs no saved data position beyond ``s``,
and N processes at a global batch of B see exactly the blocks one process sees at B.

With ``data.streaming`` the blocks are packed on the fly from the document stream through a
seeded shuffle buffer (for sets too large to tokenize up front); each process takes every
N-th block, and a resumed run skips the blocks already consumed.
"""

import random
from collections.abc import Iterator

import torch

from rehead import text
from rehead.errors import ReheadError


def _token_stream(tokenizer, spec: str) -> Iterator[list[int]]:
    eos = tokenizer.eos_token_id
    for doc in text.documents(spec):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        yield ids + ([eos] if eos is not None else [])


def pack(tokenizer, spec: str, seq_len: int, max_blocks: int | None) -> torch.Tensor:
    """(n, seq_len) blocks of the text: all of it, or the first ``max_blocks`` blocks."""
    need = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    for doc in _token_stream(tokenizer, spec):
        ids.extend(doc)
        if need is not None and len(ids) >= need:
            break
    if len(ids) < seq_len:
        raise ReheadError(
            f"data {spec!r} has {len(ids)} tokens, fewer than one block of data.seq_len={seq_len}; "
            "give more text or a shorter data.seq_len"
        )
    count = len(ids) // seq_len if need is None else min(len(ids) // seq_len, max_blocks)
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


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
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=torch.Generator().manual_seed(self.seed + epoch))}
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

    def __init__(self, tokenizer, spec: str, seq_len: int, seed: int, buffer: int, micro_batch: int,
                 grad_accum: int, world: int):
        self.tokenizer, self.spec, self.seq_len = tokenizer, spec, seq_len
        self.seed, self.buffer = seed, buffer
        self.micro_batch, self.grad_accum, self.world = micro_batch, grad_accum, world
        self._stream: Iterator[torch.Tensor] | None = None
        self._next_step = 0

    @property
    def per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def _blocks(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            rng = random.Random(self.seed + epoch)
            pool: list[torch.Tensor] = []
            ids: list[int] = []
            produced = 0
            for doc in _token_stream(self.tokenizer, self.spec):
                ids.extend(doc)
                while len(ids) >= self.seq_len:
                    pool.append(torch.tensor(ids[: self.seq_len], dtype=torch.long))
                    del ids[: self.seq_len]
                    if len(pool) >= self.buffer:
                        yield pool.pop(rng.randrange(len(pool)))
                        produced += 1
            rng.shuffle(pool)
            produced += len(pool)
            yield from pool
            if produced == 0:
                raise ReheadError(
                    f"data {self.spec!r} has fewer tokens than one block of data.seq_len={self.seq_len}; "
                    "give more text or a shorter data.seq_len"
                )
            epoch += 1

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        if self._stream is None or step != self._next_step:
            if self._stream is not None and step < self._next_step:
                raise ValueError("a streamed data set is read forwards only")
            if self._stream is None:
                self._stream = self._blocks()
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
