"""Text for calibration, training and held-out perplexity, and its tokenization into blocks.

A text spec is one of these, or several joined with commas (which then share a token budget equally):
- a built-in name: ``shakespeare`` (the plays and poems less the held-out ones), ``pydoc`` (Python's
  reference text less its held-out topics and their paragraphs), and the held-out texts of three kinds that no default
  ever calibrates or tunes on (``HELDOUT_TEXTS``): ``shakespeare-heldout`` (Hamlet, Macbeth, The
  Tempest, Twelfth Night, the Sonnets), ``pydoc-heldout`` (the topics whose key's sha256 starts with
  a byte divisible by 4: about a fifth of the text), ``python-source-heldout`` (the standard
  library's own ``.py`` files, in line-aligned pieces of about 4,000 characters in a fixed
  pseudo-random order; tests, codec tables and ``pydoc_data`` left out);
- ``self``: text sampled from the model itself (rehead.sampled), where a model is at hand
  (``rehead convert --calib``, ``rehead tune``'s ``data.train`` with a teacher);
- a local .txt/.md file (one document), a .json/.jsonl/.parquet/.csv file (a ``text`` column),
  or a folder of such files;
- a ``datasets`` Hub id: ``ID[:CONFIG][@SPLIT][#COLUMN]`` (split ``train``, column ``text`` by default), streamed.
"""

import hashlib
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from rehead import builtin
from rehead.errors import ReheadError

HELDOUT = ("hamlet", "macbeth", "tempest", "twelfth_night", "sonnets")
HELDOUT_TEXTS = ("shakespeare-heldout", "pydoc-heldout", "python-source-heldout")
BUILTIN_TEXTS = ("shakespeare", "pydoc", "self", *HELDOUT_TEXTS)
SOURCE_SKIPPED = {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "encodings"}
SOURCE_PIECE = 4000  # characters per piece of python-source-heldout
PLAIN = (".txt", ".md")
TABLES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def parts(spec: str) -> list[str]:
    """The texts a comma-joined spec names."""
    return [p.strip() for p in spec.split(",") if p.strip()]


def documents(spec: str, sampler=None) -> Iterator[str]:
    """The documents of a spec; ``sampler`` (a rehead.sampled.Sampler) is what ``self`` reads."""
    for part in parts(spec):
        yield from _documents(part, sampler)


def pydoc_heldout(key: str) -> bool:
    """Whether a pydoc topic is in the held-out part: a fixed split by the topic's key."""
    return hashlib.sha256(key.encode()).digest()[0] % 4 == 0


def _pydoc(heldout: bool) -> Iterator[str]:
    """The held-out topics, or the others less every paragraph a held-out topic also holds (topics repeat
    each other: ``compound`` holds ``for`` and ``class``), so that the two parts share no paragraph."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if heldout:
        yield from (topics[key] for key in keys if pydoc_heldout(key))
        return
    taken = {" ".join(p.split()) for key in keys if pydoc_heldout(key) for p in re.split(r"\n\s*\n", topics[key])}
    for key in keys:
        if not pydoc_heldout(key):
            kept = [p for p in re.split(r"\n\s*\n", topics[key]) if " ".join(p.split()) not in taken]
            if kept:
                yield "\n\n".join(kept)


def python_source() -> list[str]:
    """The standard library's .py files in line-aligned pieces, in an order fixed by each piece's path and number."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces = {}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if SOURCE_SKIPPED & set(relative.parts[:-1]):
            continue
        piece, number = "", 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            piece += line
            if len(piece) >= SOURCE_PIECE:
                pieces[f"{relative.as_posix()}:{number}"], piece, number = piece, "", number + 1
        if piece.strip():
            pieces[f"{relative.as_posix()}:{number}"] = piece
    return [pieces[k] for k in sorted(pieces, key=lambda k: hashlib.sha256(k.encode()).hexdigest())]


def _documents(spec: str, sampler=None) -> Iterator[str]:
    if spec in ("shakespeare", "shakespeare-heldout"):
        heldout = spec.endswith("heldout")
        for path in sorted(builtin.text_folder("shakespeare").glob("*.txt")):
            if (path.name.removesuffix("_gut.txt") in HELDOUT) == heldout:
                yield path.read_text(encoding="utf-8", errors="replace")
        return
    if spec in ("pydoc", "pydoc-heldout"):
        yield from _pydoc(spec.endswith("heldout"))
        return
    if spec == "python-source-heldout":
        yield from python_source()
        return
    if spec == "self":
        if sampler is None:
            raise ReheadError(
                "text 'self' is text sampled from the source model: rehead convert (--calib) and rehead tune "
                "(data.train, with a teacher) know which model that is; here, give a text instead"
            )
        yield from sampler.documents()
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in PLAIN or p.suffix in TABLES)
        if not files:
            raise ReheadError(f"text folder {spec}: no .txt, .md, .json, .jsonl, .parquet or .csv files in it")
        for file in files:
            yield from _documents(str(file))
    elif path.is_file():
        if path.suffix in PLAIN:
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix in TABLES:
            yield from _dataset(TABLES[path.suffix], None, "train", "text", data_files=str(path), streaming=False)
        else:
            raise ReheadError(
                f"text file {spec}: unknown kind {path.suffix!r}; use .txt, .md, .json, .jsonl, .parquet or .csv")
    elif spec.startswith(("/", "./", "../", "~")) or path.suffix in PLAIN or path.suffix in TABLES:
        raise ReheadError(f"text {spec!r}: no such file or folder")
    elif "/" in spec or spec.replace("-", "").replace("_", "").isalnum():
        rest, _, column = spec.partition("#")
        rest, _, split = rest.partition("@")
        name, _, config = rest.partition(":")
        yield from _dataset(name, config or None, split or "train", column or "text", streaming=True)
    else:
        raise ReheadError(
            f"text {spec!r}: not a built-in text ({', '.join(BUILTIN_TEXTS)}), an existing file or folder, "
            "or a datasets id ID[:CONFIG][@SPLIT][#COLUMN]"
        )


def _dataset(name, config, split, column, **kwargs) -> Iterator[str]:
    import datasets

    try:
        data = datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as e:  # datasets raises many kinds: missing files, no network, bad config names
        raise ReheadError(f"text {name!r}: could not be loaded with datasets ({type(e).__name__}: {e})") from None
    for row in data:
        if column not in row:
            raise ReheadError(f"text {name!r}: no column {column!r}; its columns are {', '.join(row)}")
        if row[column]:
            yield row[column]


def token_ids(tokenizer, spec: str, n_tokens: int, sampler=None) -> torch.Tensor:
    """``n_tokens`` tokens of the text, documents joined by the EOS token; a spec of several texts
    joined with commas takes an equal share from each. 1-D long tensor."""
    names = parts(spec)
    if not names:
        raise ReheadError(f"text {spec!r}: names no text")
    shares = [n_tokens // len(names) + (1 if i < n_tokens % len(names) else 0) for i in range(len(names))]
    return torch.cat([_first_tokens(tokenizer, part, share, sampler) for part, share in zip(names, shares)])


def _first_tokens(tokenizer, spec: str, n_tokens: int, sampler=None) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in _documents(spec, sampler):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise ReheadError(f"text {spec!r} has {len(ids)} tokens; {n_tokens} are needed (use more text or fewer tokens)")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def blocks(tokenizer, spec: str, n_tokens: int, seq_len: int, sampler=None) -> torch.Tensor:
    """(n_tokens // seq_len, seq_len) token blocks of the text."""
    if n_tokens < seq_len:
        raise ReheadError(f"{n_tokens} tokens do not fill one block of {seq_len}; ask for at least {seq_len}")
    count = n_tokens // seq_len
    return token_ids(tokenizer, spec, count * seq_len, sampler).view(count, seq_len)


def ids_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()
