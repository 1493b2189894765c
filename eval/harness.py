"""lm-evaluation-harness around an already-loaded model, with a result cache for baselines."""

import difflib
import hashlib
import json
import logging
import os
from pathlib import Path

from rehead import files
from rehead.checkpoint import sha256_file
from rehead.errors import ReheadError
from rehead.files import cache_dir
from rehead.net import check_reachable, hub_endpoint

from . import offline

log = logging.getLogger("rehead.eval")


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ReheadError("rehead eval needs lm-evaluation-harness: pip install 'rehead[eval]' (or lm-eval)") from None


def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def check_task_names(names: list[str], manager) -> None:
    known = set(manager.all_tasks) | set(offline.OFFLINE_TASKS)
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ReheadError(
            f"unknown lm-eval task(s): {'; '.join(hints)}. `lm-eval ls tasks` lists the {len(known)} known ones; "
            f"rehead's offline tasks are {', '.join(offline.OFFLINE_TASKS)}"
        )


def check_hub_reachable(names: list[str]) -> None:
    """Tasks whose data lives on the Hub fail fast, with a message, where the Hub is out of reach."""
    hub_tasks = [n for n in names if n not in offline.OFFLINE_TASKS]
    if not hub_tasks or os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # offline mode: datasets reads its cache (and says so itself when a set is not there)
    check_reachable(
        hub_endpoint(), f"task(s) {', '.join(hub_tasks)} read their data from the Hugging Face Hub",
        "Run where the Hub is reachable, set HF_DATASETS_OFFLINE=1 if the data sets are already in the local "
        "datasets cache, or use --suite offline",
    )


class ResultCache:
    """Raw lm-eval results keyed by (model files' hash, task configs, shots, limit, dtype, lm-eval version)."""

    def __init__(self, root: Path | None = None):
        self.root = root or cache_dir() / "eval-results"

    def model_hash(self, folder: Path) -> str:
        """One hash over config.json and the weight files. A file's sha256 is remembered by (path, size,
        mtime), so re-scoring against a large local baseline does not read its weights again; Hub-cached
        files reuse their blob's name."""
        known_path = self.root / "file-hashes.json"
        known = json.loads(known_path.read_text()) if known_path.is_file() else {}
        digest, changed = hashlib.sha256(), False
        for path in sorted(Path(folder).iterdir()):
            if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
                stat = path.stat()
                key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
                if key not in known:
                    known[key], changed = sha256_file(path), True
                digest.update(f"{path.name}:{known[key]}\n".encode())
        if changed:
            self._write(known_path, known)
        return digest.hexdigest()

    def _write(self, path: Path, value: dict) -> None:
        files.write_text(path, json.dumps(value))

    def key(self, model_digest: str, tasks: dict[str, int], limit, dtype: str, configs: dict[str, dict]) -> str:
        described = {
            "model": model_digest,
            "tasks": {name: [shots, offline.fingerprint(configs[name]) if name in configs else name]
                      for name, shots in sorted(tasks.items())},
            "limit": limit,
            "dtype": dtype,
            "lm_eval": lm_eval_version(),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        path = self.root / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, key: str, value: dict) -> None:
        self._write(self.root / f"{key}.json", value)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def run(model, tokenizer, tasks: dict[str, int], configs: dict[str, dict], limit, batch_size, bootstrap_iters: int,
        manager) -> dict:
    """lm-eval on ``model``: one simple_evaluate per shot count; the parts of its output rehead keeps."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    merged = {"results": {}, "higher_is_better": {}, "versions": {}, "n-shot": {}, "n-samples": {},
              "lm_eval_version": lm_eval_version()}
    for shots in sorted(set(tasks.values())):
        group = [configs.get(name, name) for name, k in tasks.items() if k == shots]
        out = lm_eval.simple_evaluate(
            model=lm, tasks=group, num_fewshot=shots, limit=limit, task_manager=manager, log_samples=False,
            bootstrap_iters=bootstrap_iters, verbosity="ERROR",
        )
        for part in ("results", "higher_is_better", "versions", "n-shot", "n-samples"):
            merged[part].update(_jsonable(out.get(part, {})))
    return merged
