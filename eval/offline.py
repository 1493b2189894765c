"""The offline suite's data: lm-eval tasks built from real text that ships with rehead (no hub access).

- ``rehead_shakespeare_ppl``: rolling log-likelihood (word/byte perplexity, bits per byte) of
  passages of the held-out plays (Hamlet, Macbeth, The Tempest, Twelfth Night, the Sonnets);
- ``rehead_pydoc_ppl``: the same on the held-out part of Python's reference text (``pydoc-heldout``:
  a different domain, and topics that no default calibrates or tunes on);
- ``rehead_cloze``: LAMBADA-style last-word prediction on speeches of the held-out plays whose
  last word already occurs earlier in the speech, so the context is needed to guess it.

The task definitions are YAML files in eval/tasks/; their ``data_files`` are filled in at run time
with the JSONL files built here once into the cache (``$REHEAD_CACHE/eval-data``).
"""

import hashlib
import json
import re
from pathlib import Path

import yaml

from rehead import builtin, text
from rehead.files import cache_dir, write_text

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = ("rehead_shakespeare_ppl", "rehead_pydoc_ppl", "rehead_cloze")
DATA_VERSION = 2  # 2: pydoc_ppl reads pydoc-heldout
WORD = re.compile(r"[A-Za-z]+")
# function words are guessable without the context: LAMBADA's targets are content words
STOP = set("""the and you your yours for not but with this that thee thou thy thine his her him hers she they them
their have has had was were are will shall would should may might must can could what which who whom whose
when where how why all any our ours out from into upon than then there here now too very more most some such
one own yet nor let did does done say said come came well good sir lord""".split())


def _passages(doc: str, min_words: int, max_words: int) -> list[str]:
    """Paragraphs (speeches, stanzas) of min..max words, whitespace-normalised within lines."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [" ".join(line.split()) for line in para.strip().splitlines() if line.strip()]
        words = sum(len(line.split()) for line in lines)
        if min_words <= words <= max_words:
            out.append("\n".join(lines))
    return out


def _ppl_docs(spec: str, limit: int, min_words: int = 60) -> list[dict]:
    docs = []
    for doc in text.documents(spec):
        docs.extend({"text": p} for p in _passages(doc, min_words, 400))
    step = max(1, len(docs) // limit)  # spread over the whole text
    return docs[::step][:limit]


def _cloze_docs(limit: int) -> list[dict]:
    docs = []
    for doc in text.documents("shakespeare-heldout"):
        for passage in _passages(doc, 15, 200):
            body = passage.rstrip(" .,;:!?'\"-")
            match = re.search(r"([A-Za-z]+)$", body)
            if not match or len(match.group(1)) < 3 or match.group(1).lower() in STOP:
                continue
            target = match.group(1)
            context = body[: match.start()]
            if not context.endswith(" ") and not context.endswith("\n"):
                continue  # the word is glued to punctuation or an apostrophe: not a clean cut
            earlier = {w.lower() for w in WORD.findall(context)}
            if target.lower() in earlier:
                docs.append({"context": context.rstrip(), "target": target, "separator": context[-1]})
    step = max(1, len(docs) // limit)
    return docs[::step][:limit]


def data_folder() -> Path:
    """Builds (once) and returns the folder of the offline tasks' JSONL files."""
    root = cache_dir() / "eval-data" / f"v{DATA_VERSION}"
    if (root / "done").is_file():
        return root
    builtin.text_folder("shakespeare")  # fetched and checked once
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "shakespeare_ppl.jsonl": _ppl_docs("shakespeare-heldout", 200),
        "pydoc_ppl.jsonl": _ppl_docs("pydoc-heldout", 200, min_words=30),  # a fifth of pydoc: shorter passages too
        "cloze.jsonl": _cloze_docs(500),
    }
    for name, rows in files.items():
        write_text(root / name, "".join(json.dumps(r) + "\n" for r in rows))
    (root / "done").write_text("")
    return root


def task_configs() -> dict[str, dict]:
    """The offline tasks as lm-eval config dicts pointing at the local data."""
    folder = data_folder()
    configs = {}
    for name in OFFLINE_TASKS:
        config = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text())
        config["dataset_kwargs"] = {"data_files": {"test": str(folder / config.pop("data_file"))}}
        configs[name] = config
    return configs


def fingerprint(config: dict) -> str:
    """A task config with its data file replaced by the file's hash: stable across machines."""
    config = json.loads(json.dumps(config))
    for split, path in config.get("dataset_kwargs", {}).get("data_files", {}).items():
        config["dataset_kwargs"]["data_files"][split] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return json.dumps(config, sort_keys=True)
