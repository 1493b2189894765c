"""``rehead pipeline``: the main job in one command, on the embedded default or any source.

What it does is data, the packaged recipe ``pipeline/default`` (recipes/pipeline/default.yaml), loaded
through the tune recipe loader with dotted overrides. For each layout: convert the source with the
layout's preset and the pipeline's lighter settings, continue-tune it briefly with distillation from
the source on a mixture of built-in text and the source's own samples, score it against the source
on the offline suite, and write its `push --dry-run` card. The source itself is tuned by the same
recipe on the same tokens (the control), so that what a layout did shows apart from what the tuning
data did. Then one table: layout, active heads, KV-cache bytes per token, held-out perplexity on the
three held-out kinds (rehead.text.HELDOUT_TEXTS) as converted and as tuned, the eval suite's primary
scores, and the average retention against the source and against the tuned source.

Like the CLI, this module knows every stage; the stages still meet only through checkpoints. The
presets are also what the benchmarks convert with (``presets()``, scripts/bench_common.py).
"""

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rehead import metrics, models, text
from rehead.card import card
from rehead.convert import CONVERTERS, ConvertOptions, convert, options_for
from rehead.describe import describe
from rehead.errors import ReheadError
from rehead.eval import evaluate
from rehead.sources import resolve
from rehead.tune import load as load_tune
from rehead.tune import tune
from rehead.tune.recipe import Recipe
from rehead.tune.recipe import load as load_recipe

log = logging.getLogger("rehead.pipeline")
RECIPE = "pipeline/default"
CONTROL = "source, tuned"  # the control's row: the source tuned by the layouts' recipe on the same tokens
Trainable = Literal["all", "attention", "new"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preset(Section):
    convert: dict = Field(default_factory=dict, description="rehead convert's options for the layout")
    trainable: Trainable = Field(description="what the layout's tuning trains (rehead tune's trainable)")


class Control(Section):
    trainable: Trainable = Field("all", description="what the source's tuning trains")


class Eval(Section):
    suite: str = Field("offline", description="rehead eval's suite, scored against the source")
    limit: int | None = Field(24, gt=0, description="examples per task (null: all)")


class Pipeline(Section):
    """The pipeline recipe (recipes/pipeline/default.yaml documents every key)."""

    source: str
    work: str
    overwrite: bool = Field(False, description="redo the pipeline in a non-empty work folder")
    layouts: list[str]
    presets: dict[str, Preset]
    lighter: dict[str, dict] = Field(default_factory=dict, description="conversion options over the presets: "
                                     "all (every layout) or per layout")
    control: Control = Control()
    heldout_tokens: int = Field(gt=0)
    eval: Eval = Eval()
    tune: dict = Field(description="a rehead tune recipe less model, teacher, trainable and output_dir")

    @field_validator("layouts", mode="before")
    @classmethod
    def _comma_joined(cls, value):
        return [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _names(self):
        for name in self.presets:
            if name not in CONVERTERS:
                raise ValueError(f"presets: {name!r} is not a layout rehead converts to; "
                                 f"choose from {', '.join(CONVERTERS)}")
        unknown = [x for x in self.layouts if x not in self.presets]
        if unknown or not self.layouts:
            raise ValueError(f"--layouts: unknown layout(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(self.presets)}")
        stray = [x for x in self.lighter if x != "all" and x not in self.presets]
        if stray:
            raise ValueError(f"lighter: {', '.join(stray)}: give 'all' or a layout of presets "
                             f"({', '.join(self.presets)})")
        own = [key for key in self.lighter.get("all", {}) if key not in ConvertOptions.model_fields]
        if own:
            raise ValueError(f"lighter.all: {', '.join(own)}: not an option every layout has; "
                             "put it under its layout (lighter.LAYOUT)")
        return self

    def conversion(self, layout: str) -> ConvertOptions:
        """The layout's conversion: its preset, then the lighter settings (every layout's, its own)."""
        values = {"to": layout, **self.presets[layout].convert, **self.lighter.get("all", {}),
                  **self.lighter.get(layout, {}), "overwrite": True}
        try:
            return options_for(values)
        except ReheadError as e:
            raise ReheadError(f"the pipeline recipe's {layout} conversion (presets.{layout}.convert, lighter): "
                              f"{e}") from None

    def tune_recipe(self, model, trainable: str, output_dir: Path) -> Recipe:
        values = {**self.tune, "model": str(model), "teacher": self.source, "trainable": trainable,
                  "output_dir": str(output_dir)}
        try:
            return load_tune(None, [], values)
        except ReheadError as e:
            raise ReheadError(f"the pipeline recipe's tune section: {str(e).removeprefix('recipe: ')}") from None


def load(overrides: list[str] = (), values: dict | None = None, path=RECIPE) -> Pipeline:
    """The pipeline recipe ``path`` (by default the packaged one) with ``values`` ({"a.b": value}) and
    ``overrides`` ("a.b=value") applied."""
    return load_recipe(path, overrides, values, schema=Pipeline)


def presets() -> dict[str, dict]:
    """The packaged presets' conversion options: ``{layout: {"to": layout, ...}}`` (what the benchmarks
    convert with; the pipeline's lighter settings are its own)."""
    return {name: {"to": name, **preset.convert} for name, preset in load().presets.items()}


def _stage(number: int, total: int, what: str) -> None:
    print(f"\n[{number}/{total}] {what}", flush=True)


def run(p: Pipeline) -> dict:
    work = Path(p.work)
    conversions = {layout: p.conversion(layout) for layout in p.layouts}  # every refusal before any work
    recipes = {layout: p.tune_recipe(work / layout, p.presets[layout].trainable, work / f"tune-{layout}")
               for layout in p.layouts}
    recipes[CONTROL] = p.tune_recipe(p.source, p.control.trainable, work / "tune-source")
    if work.exists() and not work.is_dir():
        raise ReheadError(f"--work {work}: is a file; give a folder")
    if work.exists() and any(work.iterdir()) and not p.overwrite:
        raise ReheadError(f"{work} exists and is not empty; pass --overwrite to redo the pipeline there")
    work.mkdir(parents=True, exist_ok=True)
    source_info = describe(resolve(p.source).path)
    timings: dict[str, float] = {}
    total = 3 * len(p.layouts) + 3
    _stage(1, total, f"held-out perplexity of {p.source} itself")
    source_ppl = heldout_perplexity(p.source, p.heldout_tokens, recipes[CONTROL])
    tuned = _tune(p, CONTROL, recipes[CONTROL], 2, total, timings)
    control = _score(p, CONTROL, tuned, source_ppl, recipes[CONTROL], 3, total, timings)
    control["retention_vs_control"] = 100.0
    rows = [_layout(p, layout, conversions[layout], recipes[layout], 3 + 3 * number, total, timings)
            for number, layout in enumerate(p.layouts)]
    for row in rows:
        row["retention_vs_control"] = retention_against(row["eval"], control["eval"])
    result = {"source": p.source, "source_kv_bytes_per_token": source_info["kv_cache_bytes_per_token_bf16"],
              "source_query_heads": source_info["query_heads"], "source_ppl": source_ppl, "control": control,
              "rows": rows, "recipe": p.model_dump(mode="json"), "tune": recipes[CONTROL].model_dump(mode="json"),
              "timings": timings}
    (work / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (work / "summary.md").write_text(table(result))
    return result


def heldout_perplexity(model_spec, tokens: int, recipe: Recipe) -> dict[str, float]:
    """Perplexity on ``tokens`` tokens of each held-out kind, in blocks and batches of the tuning's size."""
    model, tokenizer, _ = models.load(str(model_spec))
    return {kind: metrics.perplexity(model, text.blocks(tokenizer, kind, tokens, recipe.data.seq_len),
                                     recipe.train.micro_batch)
            for kind in text.HELDOUT_TEXTS}


def _layout(p: Pipeline, layout: str, conversion: ConvertOptions, recipe: Recipe, done: int, total: int,
            timings: dict) -> dict:
    """Converts, tunes, scores and cards one layout; returns its row of the table."""
    work = Path(p.work)
    _stage(done + 1, total, f"convert {p.source} → {layout}")
    started = time.perf_counter()
    converted = convert(p.source, work / layout, conversion)
    ppl_converted = heldout_perplexity(converted, p.heldout_tokens, recipe)
    timings[f"convert_{layout}_s"] = time.perf_counter() - started
    tuned = _tune(p, layout, recipe, done + 2, total, timings)
    row = _score(p, layout, tuned, ppl_converted, recipe, done + 3, total, timings)
    (work / "cards").mkdir(exist_ok=True)
    (work / "cards" / f"{layout}.md").write_text(str(card(tuned, f"{Path(p.source).name}-{layout}")))
    return {**row, "card": str(work / "cards" / f"{layout}.md")}


def _tune(p: Pipeline, name: str, recipe: Recipe, number: int, total: int, timings: dict) -> Path:
    _stage(number, total, f"tune {name}: {_length(recipe.model_dump())}, KD from {p.source}, "
           f"trainable: {recipe.trainable}")
    started = time.perf_counter()
    shutil.rmtree(recipe.output_dir, ignore_errors=True)
    model = tune(recipe).model
    timings[f"tune_{name}_s"] = time.perf_counter() - started
    return model


def _score(p: Pipeline, name: str, tuned: Path, ppl_before: dict, recipe: Recipe, number: int, total: int,
           timings: dict) -> dict:
    """Held-out perplexity and the eval suite against the source of one tuned model: its row of the table."""
    ppl_tuned = heldout_perplexity(tuned, p.heldout_tokens, recipe)
    _stage(number, total, f"eval {name} against {p.source}: {p.eval.suite} suite"
           + (f", {p.eval.limit} examples per task" if p.eval.limit else ""))
    started = time.perf_counter()
    outcome = evaluate(str(tuned), p.source, suite=p.eval.suite, limit=p.eval.limit, out=tuned / "eval")
    timings[f"eval_{name}_s"] = time.perf_counter() - started
    info = describe(tuned)
    heads = info["query_heads"]
    return {
        "layout": name,
        "active_heads": f"{info['options'].get('active_heads', heads)}/{heads}",
        "kv_bytes_per_token": info["kv_cache_bytes_per_token_bf16"],
        "ppl_converted": ppl_before,
        "ppl_tuned": ppl_tuned,
        "eval": outcome.rows,
        "retention": outcome.average_retention,
    }


def retention_against(rows: list[dict], control_rows: list[dict]) -> float | None:
    """The average retention of a layout against the tuned source, from both outcomes against the source.

    A task's retention against the source is 100·c/s (100·s/c where lower is better), so against the
    control t it is 100·r_c/r_t: the source's score cancels. None where a primary retention is not a
    positive finite number (a score of 0 on either side).
    """
    control = {(r["task"], r["metric"]): r["retention"] for r in control_rows if r["primary"]}
    ratios = []
    for r in rows:
        if r["primary"]:
            base = control.get((r["task"], r["metric"]))
            if base is None or not (0 < base < math.inf and 0 < r["retention"] < math.inf):
                return None
            ratios.append(100.0 * r["retention"] / base)
    return sum(ratios) / len(ratios) if ratios else None


def _number(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _row(row: dict, kinds, columns, source_ppl: dict, control_ppl: dict | None) -> str:
    """One table row; a tuned row's perplexity cells read converted → tuned (×source's, ×tuned source's)."""
    cells = []
    for kind in kinds:
        before, after = row["ppl_converted"][kind], row["ppl_tuned"][kind]
        ratios = "" if control_ppl is None else f" (×{after / source_ppl[kind]:.2f}, ×{after / control_ppl[kind]:.2f})"
        cells.append(f"{before:.2f} → {after:.2f}{ratios}")
    scores = {(r["task"], r["metric"]): r["candidate"] for r in row["eval"]}
    cells += [_number(scores.get(c), ".3g") for c in columns]
    return (f"| {row['layout']} | {row['active_heads']} | {row['kv_bytes_per_token']:,} | " + " | ".join(cells)
            + f" | {_number(row['retention'], '.1f')} | {_number(row['retention_vs_control'], '.1f')} |")


def table(result: dict) -> str:
    heads = result["source_query_heads"]
    kinds = text.HELDOUT_TEXTS
    control = result["control"]
    columns = [(r["task"], r["metric"]) for r in control["eval"] if r["primary"]]  # the suite's primary scores
    base = {(r["task"], r["metric"]): r["baseline"] for r in control["eval"]}
    lines = [
        f"source {result['source']}: {heads}/{heads} heads, KV {result['source_kv_bytes_per_token']:,} B/token (bf16)",
        "",
        "| layout | active heads | KV bytes/token | " + " | ".join(f"{k} ppl" for k in kinds) + " | "
        + " | ".join(f"{task} {metric}" for task, metric in columns) + " | retention % vs source | retention % vs tuned source |",
        "|---|---|---:|" + "---:|" * (len(kinds) + len(columns) + 2),
        f"| source | {heads}/{heads} | {result['source_kv_bytes_per_token']:,} | "
        + " | ".join(f"{result['source_ppl'][k]:.2f}" for k in kinds) + " | "
        + " | ".join(f"{base[c]:.3g}" for c in columns) + " | 100 | — |",
        _row(control, kinds, columns, result["source_ppl"], None),
    ]
    lines += [_row(row, kinds, columns, result["source_ppl"], control["ppl_tuned"]) for row in result["rows"]]
    what, settings = notes(result["recipe"], result["tune"])
    return "\n".join(lines + ["", what, "", settings]) + "\n"


def notes(recipe: dict, tuning: dict) -> list[str]:
    """What the table's numbers are, with the settings that made them: the pipeline recipe and the
    resolved tune recipe."""
    presets, limit = recipe["presets"], recipe["eval"]["limit"]
    mix = ", ".join(f"{spec}: {weight:g}" for spec, weight in text.mixture(tuning["data"]["train"]))
    conversions = "; ".join(f"{layout} {_options(presets[layout]['convert'])}" for layout in recipe["layouts"])
    trainable = ", ".join(f"{layout}: {presets[layout]['trainable']}" for layout in recipe["layouts"])
    lighter = "; ".join(_lighter(recipe["lighter"], name) for name in recipe["lighter"])
    return [
        f"ppl: perplexity on {recipe['heldout_tokens']:,} tokens of each held-out kind, converted → tuned "
        "(×a, ×b: the tuned perplexity as a multiple of the source's and of the tuned source's). "
        f"Tuning: {_length(tuning)} on the mixture {{{mix}}}, distilled from the source, training {trainable}. "
        f"{CONTROL}: the control, the source tuned by the same recipe on the same tokens "
        f"(trainable: {recipe['control']['trainable']}). Scores: the {recipe['eval']['suite']} suite (rehead eval"
        + (f", {limit} examples per task" if limit else "") + "), its primary metrics; retention: their average "
        "against the source, and against the tuned source.",
        f"Conversions: {conversions}; the pipeline's lighter settings (rehead convert's default in brackets): "
        f"{lighter or 'none'}.",
    ]


def _length(tuning: dict) -> str:
    train, seq_len = tuning["train"], tuning["data"]["seq_len"]
    steps = f"{train['max_steps']} steps" if train["max_steps"] else f"{train['max_tokens']:,} tokens in steps"
    return f"{steps} of {train['micro_batch'] * train['grad_accum']} × {seq_len} tokens"


def _options(options: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in options.items()) or "(defaults)"


def _lighter(lighter: dict, name: str) -> str:
    fields = (ConvertOptions if name == "all" else CONVERTERS[name].Options).model_fields
    return f"{name}: " + ", ".join(f"{key}={value} ({fields[key].default})" for key, value in lighter[name].items())
