"""Text for calibration, training and held-out perplexity: mixtures of texts, and their packing into blocks.

A text is one of these:
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

A spec (``--calib``, ``data.train``, ``data.eval``, ``perplexity --text``) is a mixture of texts, one syntax
everywhere: texts joined with commas, each with an optional ``=WEIGHT`` (``shakespeare=2,pydoc``; 1 when
omitted); a recipe may also give a list of them or a mapping ``{text: weight}``. The texts of a mixture share
what is asked of it in proportion to their weights (largest remainder, ties to the first text), so equal
weights split it equally:
- :func:`token_ids` and :func:`blocks` (calibration, held-out text): each text's first tokens of its share,
  one text after the other;
- :func:`pack` (training): each text packed into its own blocks, its share counted in blocks; a text with
  fewer blocks than its share is repeated;
- :func:`stream` (training on sets too large to tokenize up front): blocks packed on the fly through a seeded
  shuffle buffer, each block's text drawn by a seeded draw over the weights.
"""

import hashlib
import math
import random
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

Mixture = str | list[str] | dict[str, float]  # a spec: "a,b=2", ["a", "b=2"] or {"a": 1, "b": 2}


def mixture(spec: Mixture) -> list[tuple[str, float]]:
    """A spec as (text, weight) pairs; raises ValueError (pydantic's kind: a recipe or the options name the key)
    for one that names no text or cannot be drawn from."""
    if isinstance(spec, dict):
        pairs = [(name.strip(), float(weight)) for name, weight in spec.items()]
    elif isinstance(spec, str):
        pairs = [_weighted(part) for part in spec.split(",") if part.strip()]
    else:
        pairs = [_weighted(entry) for entry in spec]
    if not pairs:
        raise ValueError("names no text; give a text, several joined with commas (each with an optional =WEIGHT), "
                         "a list of texts or a mapping {text: weight}")
    for name, weight in pairs:
        if not name:
            raise ValueError(f"an entry of {spec!r} names no text; give TEXT or TEXT=WEIGHT")
        if "," in name and not isinstance(spec, str):
            raise ValueError(f"{name!r}: give each text of a mixture its own entry")
        if not 0 <= weight < math.inf:
            raise ValueError(f"the weight of {name!r} is {weight:g}; weights must be 0 or more, and finite")
    if not sum(w for _, w in pairs) > 0:
        raise ValueError(f"the weights sum to {sum(w for _, w in pairs):g}; give at least one positive weight, "
                         "e.g. {shakespeare: 1, pydoc: 1}")
    return pairs


def _weighted(entry: str) -> tuple[str, float]:
    """``TEXT=WEIGHT`` as (text, weight); ``TEXT`` (or a name whose part after ``=`` is no number) weighs 1."""
    name, eq, weight = entry.rpartition("=")
    if eq:
        try:
            return name.strip(), float(weight)
        except ValueError:
            pass
    return entry.strip(), 1.0


def _pairs(spec: Mixture) -> list[tuple[str, float]]:
    try:
        return mixture(spec)
    except ValueError as e:
        raise ReheadError(f"text {spec!r}: {e}") from None


def parts(spec: Mixture) -> list[str]:
    """The texts a spec names, weights aside."""
    return [name for name, _ in _pairs(spec)]


def shares(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainder, ties to the first (equal weights: equal
    shares, the first ``total % len(weights)`` one more)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def documents(spec: Mixture, sampler=None) -> Iterator[str]:
    """The documents of a spec's texts, one text after the other; ``sampler`` (a rehead.sampled.Sampler) is
    what ``self`` reads."""
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


def _token_stream(tokenizer, name: str, sampler=None) -> Iterator[list[int]]:
    """Each document of one text as token ids, ended by the EOS token."""
    eos = tokenizer.eos_token_id
    for doc in _documents(name, sampler):
        yield tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])


def _first_tokens(tokenizer, name: str, n_tokens: int | None, sampler=None) -> list[int]:
    """At least the first ``n_tokens`` tokens of one text (whole documents), or all of it."""
    ids: list[int] = []
    if n_tokens == 0:
        return ids
    for doc in _token_stream(tokenizer, name, sampler):
        ids.extend(doc)
        if n_tokens is not None and len(ids) >= n_tokens:
            break
    return ids


def token_ids(tokenizer, spec: Mixture, n_tokens: int, sampler=None) -> torch.Tensor:
    """``n_tokens`` tokens of the spec, documents joined by the EOS token, each text's share after the
    previous text's. 1-D long tensor."""
    pairs = _pairs(spec)
    ids = []
    for (name, _), share in zip(pairs, shares(n_tokens, [w for _, w in pairs])):
        got = _first_tokens(tokenizer, name, share, sampler)
        if len(got) < share:
            raise ReheadError(
                f"text {name!r} has {len(got)} tokens; {share} are needed (use more text or fewer tokens)")
        ids.extend(got[:share])
    return torch.tensor(ids, dtype=torch.long)


def blocks(tokenizer, spec: Mixture, n_tokens: int, seq_len: int, sampler=None) -> torch.Tensor:
    """(n_tokens // seq_len, seq_len) token blocks of the spec (calibration, held-out text)."""
    if n_tokens < seq_len:
        raise ReheadError(f"{n_tokens} tokens do not fill one block of {seq_len}; ask for at least {seq_len}")
    count = n_tokens // seq_len
    return token_ids(tokenizer, spec, count * seq_len, sampler).view(count, seq_len)


def pack(tokenizer, spec: Mixture, seq_len: int, n_blocks: int | None, sampler=None) -> torch.Tensor:
    """(n, seq_len) training blocks: ``n_blocks`` of them, each text's count in proportion to its weight, in
    text order (a text shorter than its share is repeated to it; a single text gives what it has, up to
    ``n_blocks``); ``n_blocks`` None: all of each text."""
    pairs = _pairs(spec)
    if len(pairs) == 1 or n_blocks is None:
        return torch.cat([_pack_text(tokenizer, name, seq_len, n_blocks, sampler) for name, _ in pairs])
    out = []
    for (name, _), count in zip(pairs, shares(n_blocks, [w for _, w in pairs])):
        if count:
            text_blocks = _pack_text(tokenizer, name, seq_len, count, sampler)
            out.append(text_blocks[torch.arange(count) % len(text_blocks)])
    return torch.cat(out)


def _pack_text(tokenizer, name: str, seq_len: int, max_blocks: int | None, sampler=None) -> torch.Tensor:
    """(n, seq_len) blocks of one text: all of it, or its first ``max_blocks`` blocks."""
    ids = _first_tokens(tokenizer, name, None if max_blocks is None else max_blocks * seq_len, sampler)
    if len(ids) < seq_len:
        raise ReheadError(
            f"data {name!r} has {len(ids)} tokens, fewer than one block of data.seq_len={seq_len}; "
            "give more text or a shorter data.seq_len"
        )
    count = len(ids) // seq_len if max_blocks is None else min(len(ids) // seq_len, max_blocks)
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def stream(tokenizer, spec: Mixture, seq_len: int, seed: int, buffer: int, sampler=None) -> Iterator[torch.Tensor]:
    """Training blocks packed on the fly, without end: a mixture draws each block's text by a seeded draw
    over the weights; each text passes through a shuffle buffer of ``buffer`` blocks."""
    pairs = _pairs(spec)
    if len(pairs) == 1:
        yield from _stream_text(tokenizer, pairs[0][0], seq_len, seed, buffer, sampler)
        return
    streams = [_stream_text(tokenizer, name, seq_len, seed + 7919 * i, buffer, sampler)
               for i, (name, _) in enumerate(pairs)]
    rng, weights = random.Random(f"mixture-{seed}"), [w for _, w in pairs]
    while True:
        yield next(streams[rng.choices(range(len(streams)), weights)[0]])


def _stream_text(tokenizer, name: str, seq_len: int, seed: int, buffer: int, sampler=None) -> Iterator[torch.Tensor]:
    """One text's blocks, pass after pass, each pass shuffled through the buffer with its own seed."""
    epoch = 0
    while True:
        rng = random.Random(seed + epoch)
        pool: list[torch.Tensor] = []
        ids: list[int] = []
        produced = 0
        for doc in _token_stream(tokenizer, name, sampler):
            ids.extend(doc)
            while len(ids) >= seq_len:
                pool.append(torch.tensor(ids[:seq_len], dtype=torch.long))
                del ids[:seq_len]
                if len(pool) >= buffer:
                    yield pool.pop(rng.randrange(len(pool)))
                    produced += 1
        rng.shuffle(pool)
        produced += len(pool)
        yield from pool
        if produced == 0:
            raise ReheadError(
                f"data {name!r} has fewer tokens than one block of data.seq_len={seq_len}; "
                "give more text or a shorter data.seq_len"
            )
        epoch += 1


def ids_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()
