"""Families that store LLaMA-form tensors otherwise (fused projections, other names): split on read,
fused back on write.

A family's ``stored(config)`` maps a stored layer tensor (name relative to the layer) to its LLaMA-form
parts, ``[(name, rows), ...]``, concatenated along the rows in that order; a renamed tensor is one part.
Phi-3's ``self_attn.qkv_proj.weight`` is ``[(q_proj, H·d), (k_proj, KV·d), (v_proj, KV·d)]``.
"""

import os
from pathlib import Path

import torch

from rehead.checkpoint import SAFE_INDEX, CheckpointReader, ShardWriter
from rehead.errors import ReheadError

from .llama import LAYER_RE

FUSING = "fusing.partial"  # the folder inside a checkpoint where its weights are rewritten fused


class SplitReader:
    """A CheckpointReader seen in the LLaMA form: a stored tensor with parts reads as its parts, lazily,
    one stored tensor at a time. A part has no stored location (``locate`` gives None), so the engine's
    byte copy falls back to reading it."""

    def __init__(self, reader: CheckpointReader, stored: dict[str, list[tuple[str, int]]]):
        self.reader = reader
        self.parts: dict[str, tuple[str, int, int]] = {}  # LLaMA-form name -> (stored name, first row, end row)
        self.rows: dict[str, int] = {}  # stored name -> the rows its parts add up to
        self._names: list[str] = []
        for name in reader.names():
            match = LAYER_RE.match(name)
            parts = stored.get(match.group(2)) if match else None
            if parts is None:
                self._names.append(name)
                continue
            start, prefix = 0, f"model.layers.{match.group(1)}."
            for part, rows in parts:
                self.parts[prefix + part] = (name, start, start + rows)
                self._names.append(prefix + part)
                start += rows
            self.rows[name] = start
        shapes = reader.shapes() if self.rows else {}  # from the shard headers: checked before any work
        for whole, rows in self.rows.items():
            if shapes[whole][0] != rows:
                raise ReheadError(
                    f"{reader.folder}: {whole} has {shapes[whole][0]} rows, but config.json's head counts, head_dim "
                    f"and sizes give {rows}; the config does not describe these weights"
                )
        self._last: tuple[str | None, torch.Tensor | None] = (None, None)

    def names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.parts:
            return self.reader.get(name)
        whole, start, stop = self.parts[name]
        if self._last[0] != whole:
            self._last = (whole, self.reader.get(whole))
        return self._last[1][start:stop]

    def get_many(self, names) -> dict[str, torch.Tensor]:
        shard = self.reader.weight_map
        return {n: self.get(n) for n in sorted(names, key=lambda n: (shard[self.parts.get(n, (n,))[0]], n))}

    def locate(self, name: str):
        return None if name in self.parts else self.reader.locate(name)

    def close(self) -> None:
        self._last = (None, None)
        self.reader.close()

    def file_hashes(self) -> dict[str, str]:
        return self.reader.file_hashes()


def fuse_back(folder: Path, stored: dict[str, list[tuple[str, int]]]) -> None:
    """Rewrites the LLaMA-form weights of ``folder`` in the family's stored form, one stored tensor in memory
    at a time; the other tensors are copied byte for byte. Weights already in that form are left alone."""
    reader = CheckpointReader(folder)
    whole_of: dict[str, tuple[str, list[str]]] = {}  # LLaMA-form name -> (stored name, its parts' names)
    for name in reader.names():
        match = LAYER_RE.match(name)
        for whole, parts in stored.items() if match else ():
            prefix = f"model.layers.{match.group(1)}."
            if match.group(2) in [part for part, _ in parts]:
                whole_of[name] = (prefix + whole, [prefix + part for part, _ in parts])
    if not whole_of:
        return
    (folder / FUSING).mkdir()
    writer = ShardWriter(folder / FUSING, max(os.path.getsize(folder / f) for f in reader.files))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name in reader.names():
        if name not in whole_of:
            writer.add_stored(name, reader.locate(name))
            continue
        whole, parts = whole_of[name]
        pending.setdefault(whole, {})[name] = reader.get(name)
        if len(pending[whole]) == len(parts):
            done = pending.pop(whole)
            writer.add(whole, torch.cat([done[part] for part in parts]))
    reader.close()
    if pending:
        parts_of = dict(whole_of.values())
        missing = [part for whole in pending for part in parts_of[whole] if part not in pending[whole]]
        raise ReheadError(f"{folder}: cannot fuse {', '.join(pending)}: the weights lack {', '.join(missing)}")
    written = writer.finish() + ([SAFE_INDEX] if (folder / FUSING / SAFE_INDEX).exists() else [])
    for name in [*reader.files, SAFE_INDEX]:
        (folder / name).unlink(missing_ok=True)
    for name in written:
        os.replace(folder / FUSING / name, folder / name)
    (folder / FUSING).rmdir()

