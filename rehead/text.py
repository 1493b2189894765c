"""Text for calibration, training and held-out perplexity, and its tokenization into blocks.

A text spec is one of these, or several joined with commas (which then share a token budget equally):
- a built-in name: ``shakespeare`` (the plays and poems less the held-out ones),
  ``shakespeare-heldout`` (Hamlet, Macbeth, The Tempest, Twelfth Night, the Sonnets: never
  used for calibration or training by default), ``pydoc`` (Python's reference text);
- a local .txt/.md file (one document), a .json/.jsonl/.parquet/.csv file (a ``text`` column),
  or a folder of such files;
- a ``datasets`` Hub id: ``ID[:CONFIG][@SPLIT][#COLUMN]`` (split ``train``, column ``text`` by default), streamed.
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from rehead import builtin
from rehead.errors import ReheadError

HELDOUT = ("hamlet", "macbeth", "tempest", "twelfth_night", "sonnets")
BUILTIN_TEXTS = ("shakespeare", "shakespeare-heldout", "pydoc")
PLAIN = (".txt", ".md")
TABLES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def documents(spec: str) -> Iterator[str]:
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        yield from _documents(part)


def _documents(spec: str) -> Iterator[str]:
    if spec in ("shakespeare", "shakespeare-heldout"):
        heldout = spec.endswith("heldout")
        for path in sorted(builtin.text_folder("shakespeare").glob("*.txt")):
            if (path.name.removesuffix("_gut.txt") in HELDOUT) == heldout:
                yield path.read_text(encoding="utf-8", errors="replace")
        return
    if spec == "pydoc":
        from pydoc_data.topics import topics

        yield from (topics[key] for key in sorted(topics))
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
            raise ReheadError(f"text file {spec}: unknown kind {path.suffix!r}; use .txt, .md, .json, .jsonl, .parquet or .csv")
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


def token_ids(tokenizer, spec: str, n_tokens: int) -> torch.Tensor:
    """``n_tokens`` tokens of the text, documents joined by the EOS token; a spec of several texts
    joined with commas takes an equal share from each. 1-D long tensor."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    shares = [n_tokens // len(parts) + (1 if i < n_tokens % len(parts) else 0) for i in range(len(parts))]
    return torch.cat([_first_tokens(tokenizer, part, share) for part, share in zip(parts, shares)])


def _first_tokens(tokenizer, spec: str, n_tokens: int) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in _documents(spec):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise ReheadError(f"text {spec!r} has {len(ids)} tokens; {n_tokens} are needed (use more text or fewer tokens)")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)


def blocks(tokenizer, spec: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(n_tokens // seq_len, seq_len) token blocks of the text."""
    if n_tokens < seq_len:
        raise ReheadError(f"{n_tokens} tokens do not fill one block of {seq_len}; ask for at least {seq_len}")
    count = n_tokens // seq_len
    return token_ids(tokenizer, spec, count * seq_len).view(count, seq_len)


def ids_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()
