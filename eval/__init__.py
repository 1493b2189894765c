"""rehead.eval: score a converted model against its original with lm-evaluation-harness.

Both models are loaded with their layouts (rehead registers them: no remote code) and scored by
lm-eval's HFLM around the loaded model with identical settings. Baseline results are cached by
(model files' hash, task configs, shots, limit, dtype, lm-eval version).
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from rehead import models
from rehead.errors import ReheadError
from rehead.files import atomic_file, check_writable, write_text
from rehead.provenance import Provenance
from rehead.sources import resolve
from rehead.validate import check_checkpoint, check_device

from . import harness, offline, report
from .suites import SUITES

log = logging.getLogger("rehead.eval")


@dataclass
class Outcome:
    """What ``evaluate`` compared and found: the rows of the report, the average retention, where it wrote."""

    candidate: str
    baseline: str
    rows: list[dict]
    average_retention: float | None
    out: Path
    baseline_cached: bool
    timings: dict = field(default_factory=dict)


def resolve_tasks(tasks: str | None, suite: str | None, num_fewshot: int | None) -> dict[str, int]:
    if (tasks is None) == (suite is None):
        raise ReheadError("give --tasks a,b,c or --suite NAME (one of them)")
    if suite is not None:
        if suite not in SUITES:
            raise ReheadError(f"unknown suite {suite!r}; the suites are {', '.join(SUITES)}")
        chosen = dict(SUITES[suite])
    else:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not names:
            raise ReheadError(f"--tasks {tasks!r}: no task names in it")
        chosen = {name: 0 for name in names}
    if num_fewshot is not None:
        chosen = {name: num_fewshot for name in chosen}
    return chosen


def default_baseline(candidate_path: Path) -> str | None:
    record = Provenance.load(candidate_path)
    return record.source_id if record else None


def check_report_folder(out: Path) -> None:
    """Refuses a report folder that is a file or cannot be written, before any model is scored."""
    if out.exists() and not out.is_dir():
        raise ReheadError(f"--out {out}: is a file; give a folder for results.json, report.md and report.png")
    check_writable(out, f"--out {out}")


def _batch_size(text: str | int):
    if isinstance(text, int) or text == "auto" or str(text).startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise ReheadError(f"--batch-size {text!r}: give a number or auto") from None
    if value < 1:
        raise ReheadError(f"--batch-size {value}: must be at least 1")
    return value


def evaluate(candidate: str, baseline: str | None = None, tasks: str | None = None, suite: str | None = None,
             num_fewshot: int | None = None, limit: float | None = None, batch_size: str | int = 1,
             device: str = "cpu", dtype: str = "fp32", out: str | Path | None = None,
             bootstrap_iters: int = 1000, use_cache: bool = True) -> Outcome:
    harness.require_lm_eval()
    chosen = resolve_tasks(tasks, suite, num_fewshot)
    batch = _batch_size(batch_size)
    if limit is not None and limit <= 0:
        raise ReheadError(f"--limit {limit}: must be positive (a count of examples per task, or a fraction < 1)")
    manager = harness.task_manager()
    harness.check_task_names(list(chosen), manager)
    harness.check_hub_reachable(list(chosen))
    configs = offline.task_configs() if any(n in offline.OFFLINE_TASKS for n in chosen) else {}
    configs = {name: config for name, config in configs.items() if name in chosen}

    check_device(device)
    cand_path = resolve(candidate).path
    baseline = baseline or default_baseline(cand_path)
    if baseline is None:
        raise ReheadError(f"{candidate}: no --baseline given and no rehead.json naming its source; give --baseline")
    out = Path(out) if out is not None else (cand_path / "eval" if Path(candidate).exists() else Path("rehead-eval"))
    check_report_folder(out)
    check_checkpoint(resolve(baseline).path, f"baseline {baseline}")  # before minutes of scoring the candidate

    timings = {}
    started = time.perf_counter()
    cand_model, cand_tok, cand_src = models.load(candidate, dtype, device)
    if cand_tok is None:
        raise ReheadError(f"{candidate}: has no tokenizer; lm-eval needs one")
    timings["load_candidate_s"] = time.perf_counter() - started

    started = time.perf_counter()
    candidate_raw = harness.run(cand_model, cand_tok, chosen, configs, limit, batch, bootstrap_iters, manager)
    timings["candidate_eval_s"] = time.perf_counter() - started
    del cand_model

    cache = harness.ResultCache()
    base_src = resolve(baseline)
    started = time.perf_counter()
    key = cache.key(cache.model_hash(base_src.path), chosen, limit, dtype, configs)
    timings["hash_baseline_s"] = time.perf_counter() - started
    baseline_raw = cache.get(key) if use_cache else None
    cached = baseline_raw is not None
    if cached:
        log.info("baseline %s: cached results (%s)", baseline, key[:12])
    else:
        started = time.perf_counter()
        base_model, base_tok, _ = models.load(baseline, dtype, device)
        if base_tok is None:
            raise ReheadError(f"baseline {baseline}: has no tokenizer; lm-eval needs one")
        if base_tok.get_vocab() != cand_tok.get_vocab():
            log.warning("baseline %s and candidate %s use different tokenizers: task scores stay comparable, "
                        "perplexity per token does not (word and byte perplexities do)", baseline, candidate)
        baseline_raw = harness.run(base_model, base_tok, chosen, configs, limit, batch, bootstrap_iters, manager)
        timings["baseline_eval_s"] = time.perf_counter() - started
        del base_model
        cache.put(key, baseline_raw)

    rows, average = report.compare(baseline_raw, candidate_raw, list(chosen))
    text = report.table(rows, average, baseline, candidate)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "candidate": {"model": candidate, "results": candidate_raw},
        "baseline": {"model": baseline, "cache_key": key, "cached": cached, "results": baseline_raw},
        "settings": {"tasks": chosen, "suite": suite, "limit": limit, "batch_size": batch, "device": device,
                     "dtype": dtype, "bootstrap_iters": bootstrap_iters},
        "comparison": rows,
        "average_retention": average,
    }
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "report.md", text)
    with atomic_file(out / "report.png") as tmp:
        report.chart(rows, average, tmp, f"{candidate} vs {baseline}")
    return Outcome(candidate, baseline, rows, average, out, cached, timings)
