"""Text sampled from a model itself (the text spec ``self``): calibration and tuning data for whoever
has none, or does not know the model's domain.

Each sample starts from the tokenizer's BOS token (its EOS token where it has no BOS, as GPT-2's
documents do) and is drawn at temperature 1 until the EOS token or ``max_len`` new tokens.
Batch ``b`` is drawn with a generator seeded by (seed, b), so the text is a pure function of the
model, the tokenizer and the settings. Batches are cached under ``$REHEAD_CACHE/sampled/KEY/``,
KEY the sha256 of the model's file hashes, the tokenizer's vocabulary and the settings; a later
call reads them instead of sampling, and draws only the batches it needs beyond them.
"""

import hashlib
import inspect
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import torch
from transformers import DynamicCache

from rehead.checkpoint import CheckpointReader
from rehead.errors import ReheadError
from rehead.files import cache_dir, write_text

log = logging.getLogger("rehead.sampled")
VERSION = 1  # of the sampling procedure: a change to it makes new cache keys


@dataclass
class Sampler:
    """Samples of ``model`` (a checkpoint folder) in the tokens of ``tokenizer``, drawn on ``device``."""

    model: Path
    tokenizer: object
    device: str = "cpu"
    seed: int = 0
    temperature: float = 1.0
    batch_size: int = 16
    max_len: int = 512
    allow_pickle: bool = False
    _model: object = field(default=None, repr=False)
    _key: str | None = field(default=None, repr=False)

    def __post_init__(self):
        self.start_and_end()  # refuses a tokenizer with nothing to start from before any work

    def start_and_end(self) -> tuple[int, int | None]:
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is None and eos is None:
            raise ReheadError(
                f"text 'self': the tokenizer of {self.model} has neither a BOS nor an EOS token, so there is no "
                "document start to sample from; give a text instead (e.g. shakespeare,pydoc or your own files)"
            )
        return (bos if bos is not None else eos), eos

    def settings(self) -> dict:
        start, end = self.start_and_end()
        return {"version": VERSION, "seed": self.seed, "temperature": self.temperature, "batch_size": self.batch_size,
                "max_len": self.max_len, "start": start, "end": end, "device": torch.device(self.device).type,
                "dtype": "float32"}

    def key(self) -> str:
        if self._key is None:
            vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
            content = {"files": CheckpointReader(self.model, self.allow_pickle).file_hashes(),
                       "settings": self.settings(), "vocab": hashlib.sha256(vocab.encode()).hexdigest()}
            self._key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]
        return self._key

    @property
    def folder(self) -> Path:
        return cache_dir() / "sampled" / self.key()

    def documents(self) -> Iterator[str]:
        """Every sample as a document, batch after batch, without end; empty samples are left out."""
        for b in count():
            yield from (doc for doc in self.batch(b) if doc)

    def batch(self, b: int) -> list[str]:
        path = self.folder / f"batch-{b:05d}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if b == 0:
            write_text(self.folder / "settings.json", json.dumps({"model": str(self.model), **self.settings()}) + "\n")
        docs = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.sample(b)]
        write_text(path, json.dumps(docs) + "\n")
        return docs

    @torch.no_grad()
    def sample(self, b: int) -> list[list[int]]:
        """Batch ``b``: ``batch_size`` samples, each the tokens drawn before its EOS (or ``max_len`` of them)."""
        if self._model is None:
            from rehead import models

            log.info("sampling calibration text from %s on %s (cached in %s)", self.model, self.device, self.folder)
            self._model = models.load(str(self.model), "fp32", self.device)[0]
        start, end = self.start_and_end()
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + b)
        cache = DynamicCache()
        # transformers 5.24 renamed the forward's past_key_values to cache
        name = "cache" if "cache" in inspect.signature(self._model.forward).parameters else "past_key_values"
        token = torch.full((self.batch_size, 1), start, dtype=torch.long, device=self.device)
        drawn, done = [], torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for _ in range(self.max_len):
            logits = self._model(token, use_cache=True, **{name: cache}).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits / self.temperature, dim=-1), 1, generator=generator)
            drawn.append(token)
            if end is not None:
                done |= token[:, 0] == end
                if done.all():
                    break
        samples = []
        for row in torch.cat(drawn, 1).tolist():
            samples.append(row[: row.index(end)] if end in row else row)
        return samples
