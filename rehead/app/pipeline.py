"""``rehead pipeline``: the main job in one command, on the embedded default or any source.

For each layout: convert the source, continue-tune it briefly with distillation from the source on
a mixture of built-in text and the source's own samples, score it against the source on the
offline suite, and write its `push --dry-run` card; then one table: layout, active heads, KV-cache
bytes per token, held-out perplexity on the three held-out kinds (rehead.text.HELDOUT_TEXTS) of
the conversion and of the tuned model, offline-suite scores and the average retention.

Like the CLI, this module knows every stage; the stages still meet only through checkpoints. Each
layout is converted with its converter's ``preset`` and tuned with its ``trainable`` selection
(rehead.convert.CONVERTERS): the same settings the CPU recipes, the README and scripts/ use.
"""

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rehead import metrics, models, text
from rehead.card import card
from rehead.convert import CONVERTERS, convert
from rehead.describe import describe
from rehead.errors import ReheadError
from rehead.eval import evaluate
from rehead.sources import resolve
from rehead.tune import load, tune

log = logging.getLogger("rehead.pipeline")
TRAIN = {"shakespeare": 1, "pydoc": 1, "self": 1}  # tuning restores the source on every kind of text


def presets() -> dict[str, dict]:
    """The conversion options of every layout that has a preset: ``{layout: {"to": layout, ...}}``."""
    return {name: {"to": name, **c.preset} for name, c in CONVERTERS.items() if c.preset}


@dataclass
class Settings:
    source: str = "smollm2-135m"
    layouts: tuple[str, ...] = ("moh", "dha", "gda")
    work: Path = Path("runs/pipeline")
    calib_tokens: int = 4096
    steps: int = 8
    micro_batch: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    eval_tokens: int = 2048  # of each held-out text
    train: dict = field(default_factory=lambda: dict(TRAIN))
    limit: int | None = 24
    overwrite: bool = False
    timings: dict = field(default_factory=dict)


def _stage(number: int, total: int, what: str) -> None:
    print(f"\n[{number}/{total}] {what}", flush=True)


def check_settings(s: Settings) -> None:
    """Refuses, in the flags' own names, what would otherwise fail minutes into the work."""
    if not s.layouts:
        raise ReheadError("--layouts: no layout given; give some of moh, dha, gda (comma-separated)")
    if s.steps < 1:
        raise ReheadError(f"--steps {s.steps}: must be at least 1")
    if s.limit is not None and s.limit < 1:
        raise ReheadError(f"--limit {s.limit}: must be at least 1 (or 0 on the command line: every example)")
    if Path(s.work).exists() and not Path(s.work).is_dir():
        raise ReheadError(f"--work {s.work}: is a file; give a folder")


def run(s: Settings) -> dict:
    check_settings(s)
    conversions = presets()
    unknown = [x for x in s.layouts if x not in conversions]
    if unknown:
        raise ReheadError(f"--layouts: unknown layout(s) {', '.join(unknown)}; choose from {', '.join(conversions)}")
    work = Path(s.work)
    if work.exists() and any(work.iterdir()) and not s.overwrite:
        raise ReheadError(f"{work} exists and is not empty; pass --overwrite to redo the pipeline there")
    work.mkdir(parents=True, exist_ok=True)
    source_info = describe(resolve(s.source).path)
    total = 3 * len(s.layouts) + 1
    rows = [_layout(s, layout, conversions[layout], 3 * number, total) for number, layout in enumerate(s.layouts)]
    _stage(total, total, f"held-out perplexity of {s.source} itself")
    source_ppl = heldout_perplexity(s, s.source)
    result = {"source": s.source, "source_kv_bytes_per_token": source_info["kv_cache_bytes_per_token_bf16"],
              "source_query_heads": source_info["query_heads"], "source_ppl": source_ppl, "rows": rows,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()}}
    (work / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (work / "summary.md").write_text(table(result))
    return result


def heldout_perplexity(s: Settings, model_spec) -> dict[str, float]:
    """Perplexity on ``s.eval_tokens`` tokens of each held-out kind."""
    model, tokenizer, _ = models.load(str(model_spec))
    return {kind: metrics.perplexity(model, text.blocks(tokenizer, kind, s.eval_tokens, s.seq_len), s.micro_batch)
            for kind in text.HELDOUT_TEXTS}


def _layout(s: Settings, layout: str, conversion: dict, done: int, total: int) -> dict:
    """Converts, tunes, scores and cards one layout; returns its row of the table."""
    work = Path(s.work)
    _stage(done + 1, total, f"convert {s.source} → {layout}")
    started = time.perf_counter()
    converted = convert(s.source, work / layout, **conversion, calib_tokens=s.calib_tokens,
                        calib_seq_len=min(512, s.calib_tokens), overwrite=True)
    ppl_converted = heldout_perplexity(s, converted)
    s.timings[f"convert_{layout}_s"] = time.perf_counter() - started

    _stage(done + 2, total, f"tune {layout}: {s.steps} steps of {s.micro_batch}×{s.seq_len} tokens, KD from {s.source}")
    started = time.perf_counter()
    recipe = load(None, [], {
        "model": str(converted), "teacher": s.source, "data.train": s.train, "data.eval": None,
        "data.seq_len": s.seq_len,
        "loss.lm": 0.5, "loss.kd": 1.0, "optim.lr": s.lr, "optim.min_lr": s.lr / 10, "optim.weight_decay": 0.0,
        "optim.warmup_steps": min(2, s.steps - 1), "train.max_steps": s.steps, "train.micro_batch": s.micro_batch,
        "train.keep_last": 1, "trainable": CONVERTERS[layout].trainable, "output_dir": str(work / f"tune-{layout}"),
        "resume": "never", "log": "csv",
    })
    shutil.rmtree(work / f"tune-{layout}", ignore_errors=True)
    tuned = tune(recipe)
    ppl_tuned = heldout_perplexity(s, tuned.model)
    s.timings[f"tune_{layout}_s"] = time.perf_counter() - started

    _stage(done + 3, total, f"eval {layout} (tuned) against {s.source}: offline suite"
           + (f", {s.limit} examples per task" if s.limit else ""))
    started = time.perf_counter()
    outcome = evaluate(str(tuned.model), s.source, suite="offline", limit=s.limit, out=tuned.model / "eval")
    s.timings[f"eval_{layout}_s"] = time.perf_counter() - started

    (work / "cards").mkdir(exist_ok=True)
    (work / "cards" / f"{layout}.md").write_text(str(card(tuned.model, f"{Path(s.source).name}-{layout}")))
    info = describe(tuned.model)
    heads = info["query_heads"]
    return {
        "layout": layout,
        "active_heads": f"{info['options'].get('active_heads', heads)}/{heads}",
        "kv_bytes_per_token": info["kv_cache_bytes_per_token_bf16"],
        "ppl_converted": ppl_converted,
        "ppl_tuned": ppl_tuned,
        "scores": {r["task"] + ":" + r["metric"]: (r["baseline"], r["candidate"]) for r in outcome.rows},
        "retention": outcome.average_retention,
        "card": str(work / "cards" / f"{layout}.md"),
    }


def table(result: dict) -> str:
    def score(row, key):
        pair = row["scores"].get(key)
        return f"{pair[1]:.3g}" if pair else "—"

    heads = result["source_query_heads"]
    kinds = text.HELDOUT_TEXTS
    source = result["source_ppl"]
    lines = [
        f"source {result['source']}: {heads}/{heads} heads, KV {result['source_kv_bytes_per_token']:,} B/token (bf16)",
        "",
        "| layout | active heads | KV bytes/token | " + " | ".join(f"{k} ppl" for k in kinds)
        + " | cloze acc | Shakespeare word ppl | pydoc word ppl | retention % |",
        "|---|---|---:|" + "---:|" * (len(kinds) + 4),
    ]
    first = result["rows"][0]["scores"] if result["rows"] else {}
    base = {k: v[0] for k, v in first.items()}
    lines.append(f"| source | {heads}/{heads} | {result['source_kv_bytes_per_token']:,} | "
                 + " | ".join(f"{source[k]:.2f}" for k in kinds) + " | "
                 f"{base.get('rehead_cloze:acc', float('nan')):.3g} | "
                 f"{base.get('rehead_shakespeare_ppl:word_perplexity', float('nan')):.3g} | "
                 f"{base.get('rehead_pydoc_ppl:word_perplexity', float('nan')):.3g} | 100 |")
    for row in result["rows"]:
        moves = " | ".join(f"{row['ppl_converted'][k]:.2f} → {row['ppl_tuned'][k]:.2f}" for k in kinds)
        lines.append(
            f"| {row['layout']} | {row['active_heads']} | {row['kv_bytes_per_token']:,} | {moves} | "
            f"{score(row, 'rehead_cloze:acc')} | {score(row, 'rehead_shakespeare_ppl:word_perplexity')} | "
            f"{score(row, 'rehead_pydoc_ppl:word_perplexity')} | {row['retention']:.1f} |"
        )
    settings = result["settings"]
    mix = ", ".join(f"{spec}: {weight}" for spec, weight in settings["train"].items())
    lines += ["", f"ppl: perplexity on {settings['eval_tokens']:,} tokens of each held-out text, converted → tuned "
              f"(tuning: {settings['steps']} steps on the mixture {{{mix}}}, distilled from the source); "
              "scores: the offline suite (rehead eval); retention: its average over the tasks' primary metrics."]
    return "\n".join(lines) + "\n"
