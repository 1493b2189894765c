"""Checkpoint I/O: lazy shard-at-a-time reading, streamed sharded writing, atomic output folders."""

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rehead.errors import ReheadError
from rehead.formats import describe_folder

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
PICKLE_INDEX, PICKLE_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
EXTRA_FILES = ("generation_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        what = describe_folder(Path(folder))
        raise ReheadError(f"{folder}: " + (f"no config.json: {what}" if what else
                                          "no config.json; a checkpoint folder needs one (is this a model folder?)"))
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReheadError(f"{path}: not valid JSON ({e}); the file is corrupt, download it again") from None
    if not isinstance(config, dict):
        raise ReheadError(f"{path}: holds a JSON {type(config).__name__}, not an object of config fields; "
                          "the file is corrupt or not a transformers config")
    return config


class CheckpointReader:
    """Reads a checkpoint's tensors lazily, one shard open at a time.

    Pickled ``.bin`` weights are read only with ``allow_pickle`` and then with
    ``torch.load(weights_only=True)``: a checkpoint never runs code on this machine.
    """

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.pickled = False
        if (self.folder / SAFE_INDEX).is_file():
            self.weight_map = self._index(SAFE_INDEX)
        elif (self.folder / SAFE_SINGLE).is_file():
            self.weight_map = None
        elif (self.folder / PICKLE_INDEX).is_file() or (self.folder / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise ReheadError(
                    f"{self.folder}: weights are pickled .bin files; loading pickles can run code. "
                    "Pass --allow-pickle to read them anyway (with torch.load(weights_only=True)), "
                    "or convert them to safetensors first"
                )
            self.pickled = True
            self.weight_map = self._index(PICKLE_INDEX) if (self.folder / PICKLE_INDEX).is_file() else None
        else:
            what = describe_folder(self.folder)
            raise ReheadError(f"{self.folder}: no model.safetensors, safetensors index or pytorch_model.bin found"
                              + (f": {what}" if what else ""))
        if self.weight_map is None:
            single = PICKLE_SINGLE if self.pickled else SAFE_SINGLE
            self.weight_map = {name: single for name in self._shard_names(single)}
        self.files = sorted(set(self.weight_map.values()))
        if not self.pickled:
            for name in self.files:  # validates every header before any work starts
                absent = sorted({t for t, shard in self.weight_map.items() if shard == name}
                                - set(self._shard_names(name)))
                if absent:
                    raise ReheadError(f"{self.folder / name}: lacks {', '.join(absent[:3])}"
                                      f"{f' and {len(absent) - 3} more' if len(absent) > 3 else ''}, which the "
                                      "index maps to it; the download is incomplete or the index is wrong")
        self._open_name = None
        self._open = None

    def _index(self, index_name: str) -> dict[str, str]:
        try:
            weight_map = json.loads((self.folder / index_name).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ReheadError(f"{self.folder / index_name}: not a valid weight index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ReheadError(f"{self.folder / index_name}: weight_map must map tensor names to shard file names")
        leaving = sorted({f for f in weight_map.values() if not _inside(f)})
        if leaving:
            raise ReheadError(f"{self.folder / index_name}: names shards outside the checkpoint folder "
                              f"({', '.join(leaving)}); a shard is a file name in the folder. Nothing was opened")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise ReheadError(f"{self.folder}: the index names shards that are missing: {', '.join(missing)}")
        return weight_map

    def _shard_names(self, name: str) -> list[str]:
        path = self.folder / name
        if self.pickled:
            return list(self._load_pickle(path))
        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ReheadError(
                f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt, download it again"
            ) from None

    @staticmethod
    def _load_pickle(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ReheadError(f"{path}: could not be read as weights-only torch pickle ({e})") from None

    def names(self) -> list[str]:
        return list(self.weight_map)

    def headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor's (safetensors dtype name, shape), from the shard headers (no tensor data is read)."""
        entries = {}
        for name in self.files:
            if self.pickled:
                entries.update({k: (_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape))
                                for k, v in self._load_pickle(self.folder / name).items()})
            else:
                shard = _ShardFile(self.folder / name)
                shard.file.close()
                entries.update({k: (v["dtype"], tuple(v["shape"])) for k, v in shard.header.items()
                                if k != "__metadata__"})
        return entries

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the shard headers (no tensor data is read)."""
        shapes = {}
        for name in self.files:
            if self.pickled:
                shapes.update({k: tuple(v.shape) for k, v in self._load_pickle(self.folder / name).items()})
            else:
                with safe_open(self.folder / name, framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return shapes

    def get(self, name: str) -> torch.Tensor:
        shard = self.weight_map[name]
        if shard != self._open_name:
            self.close()
            path = self.folder / shard
            self._open = self._load_pickle(path) if self.pickled else _ShardFile(path)
            self._open_name = shard
        tensor = self._open[name].clone() if self.pickled else self._open.read(name)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ReheadError(f"{self.folder / shard}: tensor {name} holds {bad} NaN or infinite values; the "
                              "checkpoint is broken (a diverged training run or a bad download): use another one")
        return tensor

    def locate(self, name: str) -> "Stored | None":
        """Where a tensor's bytes lie in its safetensors shard (None for pickled weights)."""
        if self.pickled:
            return None
        path = self.folder / self.weight_map[name]
        if self._open_name != self.weight_map[name]:
            return _ShardFile.locate_in(path, name)
        return self._open.locate(name)

    def get_many(self, names) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in sorted(names, key=lambda n: (self.weight_map[n], n))}

    def close(self) -> None:
        if isinstance(self._open, _ShardFile):
            self._open.file.close()
        self._open, self._open_name = None, None

    def file_hashes(self) -> dict[str, str]:
        return {name: sha256_file(self.folder / name) for name in ["config.json", *self.files]}


def _inside(name: str) -> bool:
    """Whether a shard name from an index stays in the checkpoint folder (judged from the name alone)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts and "\\" not in name


@dataclass(frozen=True)
class Stored:
    """A tensor's bytes in a safetensors file."""

    path: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: list


class _ShardFile:
    """Reads single tensors of a safetensors file (already validated by safe_open) with plain file reads.

    safe_open memory-maps the whole shard, and every page a read touches stays in the process's
    resident set until the shard is closed: peak RSS would grow with the shard size. A plain
    read keeps only the tensor itself in memory.
    """

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        (size,) = struct.unpack("<Q", self.file.read(8))
        self.header = json.loads(self.file.read(size))
        self.start = 8 + size

    def locate(self, name: str) -> "Stored":
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        return Stored(Path(self.file.name), self.start + begin, end - begin, entry["dtype"], entry["shape"])

    @staticmethod
    def locate_in(path: Path, name: str) -> "Stored":
        shard = _ShardFile(path)
        try:
            return shard.locate(name)
        finally:
            shard.file.close()

    def read(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled, unlike a bytearray
        self.file.seek(self.start + begin)
        if self.file.readinto(buffer.numpy().data) != len(buffer):
            raise ReheadError(f"{self.file.name}: ends inside tensor {name}; the file is truncated, download it again")
        return buffer.view(_FROM_SAFETENSORS[entry["dtype"]]).reshape(entry["shape"])


def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    blob = Path(path).resolve()
    if blob.parent.name == "blobs" and len(blob.name) == 64 and all(c in "0123456789abcdef" for c in blob.name):
        return blob.name  # a Hub cache names an LFS file's blob by its sha256: no need to read it
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_SAFETENSORS = {name: dtype for dtype, name in _DTYPES.items()}
STORED_DTYPES = _DTYPES
FLOATS = ("F32", "F16", "BF16", "F64")


class ShardWriter:
    """Writes tensors straight to safetensors shards as they come, so memory holds one tensor at a time.

    Each shard reserves room for its header and pads the JSON with spaces (the format allows it);
    a shard closes when it would pass ``max_shard_bytes`` or its header room. ``finish`` names
    the shards model-0000i-of-0000n.safetensors (or model.safetensors when there is one) and
    writes the index, as transformers does.
    """

    HEADER_ROOM = 1 << 18

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[tuple[str, dict]] = []
        self.total_bytes = 0
        self._file = None

    def _header(self, entries: dict) -> bytes:
        return json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()

    def _start(self) -> None:
        name = f"shard-{len(self.shards):05d}.partial"
        self._file = open(self.folder / name, "wb")
        self._file.write(b"\0" * (8 + self.HEADER_ROOM))
        self._entries, self._offset = {}, 0
        self.shards.append((name, self._entries))

    def _close(self) -> None:
        header = self._header(self._entries)
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self.HEADER_ROOM) + header + b" " * (self.HEADER_ROOM - len(header)))
        self._file.close()
        self._file = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        entry = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape)}
        self._make_room(name, entry, nbytes)
        self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        self._record(name, entry, nbytes)

    def _make_room(self, name: str, entry: dict, nbytes: int) -> None:
        if any(name in entries for _, entries in self.shards):
            raise ValueError(f"tensor {name} written twice")
        if self._file is not None:
            grown = self._header({**self._entries, name: {**entry, "data_offsets": [0, 0]}})
            if self._offset + nbytes > self.max_shard_bytes or len(grown) + 64 > self.HEADER_ROOM:
                self._close()
        if self._file is None:
            self._start()

    def _record(self, name: str, entry: dict, nbytes: int) -> None:
        self._entries[name] = {**entry, "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total_bytes += nbytes

    def add_stored(self, name: str, stored: Stored) -> None:
        """Copies a tensor byte for byte from another safetensors file, in the kernel where it can."""
        self._make_room(name, {"dtype": stored.dtype, "shape": list(stored.shape)}, stored.nbytes)
        self._file.flush()
        with open(stored.path, "rb") as source:
            copied = 0
            try:
                while copied < stored.nbytes:
                    n = os.copy_file_range(source.fileno(), self._file.fileno(), stored.nbytes - copied,
                                           stored.offset + copied)
                    if n == 0:
                        raise ReheadError(f"{stored.path}: ends inside tensor {name}; the file is truncated")
                    copied += n
            except OSError:  # a file system without copy_file_range: copy through user space
                self._file.seek(0, os.SEEK_END)
                source.seek(stored.offset + copied)
                while copied < stored.nbytes:
                    block = source.read(min(1 << 24, stored.nbytes - copied))
                    if not block:
                        raise ReheadError(f"{stored.path}: ends inside tensor {name}; the file is truncated") from None
                    self._file.write(block)
                    copied += len(block)
        self._file.seek(0, os.SEEK_END)
        self._record(name, {"dtype": stored.dtype, "shape": list(stored.shape)}, stored.nbytes)

    def finish(self) -> list[str]:
        if self._file is not None:
            self._close()
        count = len(self.shards)
        names = [SAFE_SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (partial, entries), final in zip(self.shards, names):
            os.replace(self.folder / partial, self.folder / final)
            weight_map.update({tensor: final for tensor in entries if tensor != "__metadata__"})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copies the tokenizer, generation config and licence files; returns the tokenizer files copied."""
    copied = []
    for name in TOKENIZER_FILES + EXTRA_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return [name for name in copied if name in TOKENIZER_FILES]
