"""Training data: text tokenized and packed into fixed blocks, in an order fixed by the seed.

The batch of step ``s`` is a pure function of (seed, s), whatever the number of processes:
global sample ``i`` is block ``perm_e[i mod n]`` of epoch ``e = i // n``, each epoch with its own
seeded permutation. Resuming at step ``s`` therefore needs no saved data position beyond ``s``,
and N processes at a global batch of B see exactly the blocks one process sees at B.

``data.train`` may be a weighted mixture of texts (``{shakespeare: 1, pydoc: 1, self: 1}``, or a
list or comma-joined spec for equal weights): the run's blocks are then drawn from each text in
proportion to its weight (largest remainder; a text with fewer blocks than its share is repeated)
and permuted together, so the order stays a pure function of (seed, s). ``self`` is text sampled
from the teacher (rehead.sampled).

With ``data.streaming`` the blocks are packed on the fly from the document stream through a
seeded shuffle buffer (for sets too large to tokenize up front); a mixture picks each block's
text by a seeded draw over the weights; each process takes every N-th block, and a resumed run
skips the blocks already consumed.
"""

import random
from collections.abc import Iterator

import torch

from rehead import text
from rehead.errors import ReheadError


def mixture(train: str | list[str] | dict[str, float]) -> list[tuple[str, float]]:
    """``data.train`` as (text, weight) pairs; raises ValueError for a mixture that cannot be drawn from."""
    if isinstance(train, str):
        pairs = [(spec, 1.0) for spec in text.parts(train)]
    elif isinstance(train, list):
        pairs = [(spec.strip(), 1.0) for spec in train]
    else:
        pairs = [(spec.strip(), float(weight)) for spec, weight in train.items()]
    if not pairs:
        raise ValueError("names no text; give a text, a list of texts or a mapping {text: weight}")
    for spec, weight in pairs:
        if "," in spec and not isinstance(train, str):
            raise ValueError(f"{spec!r}: give each text of a mixture its own entry")
        if not weight >= 0:
            raise ValueError(f"the weight of {spec!r} is {weight:g}; weights must be 0 or more")
    if not sum(w for _, w in pairs) > 0:
        raise ValueError(f"the weights sum to {sum(w for _, w in pairs):g}; give at least one positive weight, "
                         "e.g. {shakespeare: 1, pydoc: 1}")
    return pairs


def _token_stream(tokenizer, spec: str, sampler=None) -> Iterator[list[int]]:
    eos = tokenizer.eos_token_id
    for doc in text.documents(spec, sampler):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        yield ids + ([eos] if eos is not None else [])


def pack_mixture(tokenizer, parts: list[tuple[str, float]], seq_len: int, n_blocks: int, sampler=None) -> torch.Tensor:
    """``n_blocks`` blocks, each text's count in proportion to its weight (largest remainder), in text order."""
    if len(parts) == 1:
        return pack(tokenizer, parts[0][0], seq_len, n_blocks, sampler)
    total = sum(w for _, w in parts)
    exact = [n_blocks * w / total for _, w in parts]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: counts[i] - exact[i])[: n_blocks - sum(counts)]:
        counts[i] += 1
    out = []
    for (spec, _), count in zip(parts, counts):
        if count:
            blocks = pack(tokenizer, spec, seq_len, count, sampler)
            out.append(blocks[torch.arange(count) % len(blocks)])  # a short text is repeated to its share
    return torch.cat(out)


def pack(tokenizer, spec: str, seq_len: int, max_blocks: int | None, sampler=None) -> torch.Tensor:
    """(n, seq_len) blocks of the text: all of it, or the first ``max_blocks`` blocks."""
    need = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    for doc in _token_stream(tokenizer, spec, sampler):
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
        self.tokenizer, self.parts, self.seq_len = tokenizer, mixture(spec), seq_len
        self.seed, self.buffer, self.sampler = seed, buffer, sampler
        self.micro_batch, self.grad_accum, self.world = micro_batch, grad_accum, world
        self._stream: Iterator[torch.Tensor] | None = None
        self._next_step = 0

    @property
    def per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def _blocks(self) -> Iterator[torch.Tensor]:
        if len(self.parts) == 1:
            yield from self._text_blocks(self.parts[0][0], self.seed)
            return
        streams = [self._text_blocks(spec, self.seed + 7919 * i) for i, (spec, _) in enumerate(self.parts)]
        rng, weights = random.Random(f"mixture-{self.seed}"), [w for _, w in self.parts]
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights)[0]])

    def _text_blocks(self, spec: str, seed: int) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            rng = random.Random(seed + epoch)
            pool: list[torch.Tensor] = []
            ids: list[int] = []
            produced = 0
            for doc in _token_stream(self.tokenizer, spec, self.sampler):
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
                    f"data {spec!r} has fewer tokens than one block of data.seq_len={self.seq_len}; "
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
