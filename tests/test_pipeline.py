"""rehead pipeline: convert, tune, eval and card every layout of a source in one command."""

import json

import pytest

from rehead import text

pytest.importorskip("lm_eval")

from rehead.app import pipeline
from rehead.checkpoint import read_config  # noqa: E402
from rehead.errors import ReheadError  # noqa: E402
from rehead.provenance import Provenance  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """REHEAD_CACHE in tmp_path: the samples of the tiny source and the eval results are this run's own;
    the built-in texts are the machine's, linked so that they are not fetched again."""
    from rehead.files import cache_dir

    texts = cache_dir() / "texts"
    texts.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "texts").symlink_to(texts, target_is_directory=True)
    monkeypatch.setenv("REHEAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_pipeline_runs_every_stage_for_every_layout(tiny, tmp_path, cache):
    src = tiny("gqa")
    settings = pipeline.load(values={
        "source": str(src), "work": str(tmp_path / "work"), "lighter.all.calib_tokens": 512,
        "tune.train.max_steps": 2, "tune.train.micro_batch": 2, "tune.data.seq_len": 64, "heldout_tokens": 256,
        "eval.limit": 2, "tune.optim.lr": 1e-3})
    result = pipeline.run(settings)
    assert [r["layout"] for r in result["rows"]] == ["moh", "dha", "gda"]
    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    assert summary["rows"] == json.loads(json.dumps(result["rows"]))
    by = {r["layout"]: r for r in result["rows"]}
    source_kv = result["source_kv_bytes_per_token"]
    assert by["dha"]["kv_bytes_per_token"] == source_kv // 2 and by["moh"]["kv_bytes_per_token"] == source_kv
    assert by["moh"]["active_heads"] == "4/6"  # 0.75 of 6 heads, rounded down
    assert list(result["source_ppl"]) == list(text.HELDOUT_TEXTS)
    for kind, ppl in result["source_ppl"].items():  # grown GDA starts as the source
        assert by["gda"]["ppl_converted"][kind] == pytest.approx(ppl, rel=1e-4)
    # the default tuning mixture holds the teacher's own samples
    assert settings.tune["data"]["train"] == {"shakespeare": 1, "pydoc": 1, "self": 1}
    assert list((tmp_path / "cache" / "sampled").glob("*/batch-00000.json"))
    for row in result["rows"]:
        assert set(row["ppl_tuned"]) == set(text.HELDOUT_TEXTS) and row["retention"] > 0
        assert all(row["ppl_tuned"][k] != row["ppl_converted"][k] for k in text.HELDOUT_TEXTS)
        card = (tmp_path / "work" / "cards" / f"{row['layout']}.md").read_text()
        assert card.startswith("---\n") and "## Continue-tuning" in card and "## Evaluation" in card
        assert (tmp_path / "work" / f"tune-{row['layout']}" / "model" / "eval" / "report.png").is_file()
    table = (tmp_path / "work" / "summary.md").read_text()
    assert "| dha | 6/6 |" in table and "| source |" in table and "python-source-heldout ppl" in table
    assert "{shakespeare: 1, pydoc: 1, self: 1}" in table
    # the control: the source tuned by the same recipe on the same tokens; every layout is read against it
    control = result["control"]
    assert control["layout"] == "source, tuned" and control["ppl_converted"] == result["source_ppl"]
    assert all(control["ppl_tuned"][k] != result["source_ppl"][k] for k in text.HELDOUT_TEXTS)
    assert "| source, tuned | 6/6 |" in table and "retention % vs tuned source" in table
    same = lambda folder: {k: v for k, v in Provenance.load(folder).tune.recipe.items()  # noqa: E731
                           if k not in ("model", "trainable", "output_dir")}
    for layout in ("source", "moh", "dha", "gda"):
        assert same(tmp_path / "work" / f"tune-{layout}" / "model") == same(tmp_path / "work" / "tune-dha" / "model")
    for row in result["rows"]:
        assert row["retention_vs_control"] == pytest.approx(pipeline.retention_against(row["eval"], control["eval"]))
    # the table's score columns are the suite's primary metrics, as the eval Outcome names them
    primaries = [f"{r['task']} {r['metric']}" for r in control["eval"] if r["primary"]]
    assert len(primaries) == 3 and all(name in table.splitlines()[2] for name in primaries)
    assert "dha: refine_steps=0 (30)" in table and "all: calib_tokens=512 (8192)" in table


def test_the_pipeline_runs_mla(tiny, tmp_path, cache):
    settings = pipeline.load(values={
        "source": str(tiny("gqa")), "work": str(tmp_path / "work"), "layouts": "mla", "lighter.all.calib_tokens": 512,
        "tune.train.max_steps": 1, "tune.train.micro_batch": 2, "tune.data.seq_len": 64, "heldout_tokens": 128,
        "eval.limit": 2})
    result = pipeline.run(settings)
    (row,) = result["rows"]
    assert row["layout"] == "mla" and row["kv_bytes_per_token"] == result["source_kv_bytes_per_token"] // 2
    assert read_config(tmp_path / "work" / "tune-mla" / "model")["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "| mla |" in (tmp_path / "work" / "summary.md").read_text()


def test_an_existing_work_folder_needs_overwrite(tiny, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "something").write_text("x")
    with pytest.raises(ReheadError, match="--overwrite"):
        pipeline.run(pipeline.load(values={"source": str(tiny("gqa")), "work": str(tmp_path / "work")}))


def test_the_recipe_is_refused_before_any_work(tiny, tmp_path):
    base = {"source": str(tiny("gqa")), "work": str(tmp_path / "work")}
    with pytest.raises(ReheadError, match=r"tune section: optim\.lr: .*greater than 0"):
        pipeline.run(pipeline.load(["tune.optim.lr=-1"], base))
    with pytest.raises(ReheadError, match=r"dha conversion .*--kv-budget 1\.5"):
        pipeline.run(pipeline.load(["presets.dha.convert.kv_budget=1.5"], base))
    with pytest.raises(ReheadError, match="unknown layout"):
        pipeline.load(["layouts=moh,xyz"], base)
    with pytest.raises(ReheadError, match="lighter.all: refine_steps: not an option every layout has"):
        pipeline.load(["lighter.all.refine_steps=0"], base)
    assert not (tmp_path / "work").exists()


def test_the_presets_are_the_packaged_recipes():
    assert pipeline.presets() == {"moh": {"to": "moh", "router": "learned"}, "dha": {"to": "dha", "kv_budget": 0.5},
                                  "gda": {"to": "gda", "ratio": 3}, "mla": {"to": "mla", "kv_budget": 0.5}}
    recipe = pipeline.load(["tune.train.max_steps=40"], {"layouts": "dha"})
    assert recipe.layouts == ["dha"] and recipe.tune["train"]["max_steps"] == 40
    assert recipe.conversion("dha").refine_steps == 0 and recipe.conversion("dha").calib_tokens == 4096
    assert recipe.conversion("mla").refine_steps == 0
    assert recipe.tune_recipe("m", "attention", "out").trainable == "attention"


def score(task, metric, baseline, candidate, retention, primary=True) -> dict:
    return {"task": task, "metric": metric, "baseline": baseline, "candidate": candidate, "retention": retention,
            "primary": primary}


def test_retention_against_the_control_cancels_the_source():
    # acc (higher is better): source 0.5, layout 0.4, control 0.6; ppl (lower is better): 10, 20, 8
    layout = [score("a", "acc", 0.5, 0.4, 80.0), score("p", "ppl", 10, 20, 50.0), score("a", "n", 1, 9, 900, False)]
    control = [score("a", "acc", 0.5, 0.6, 120.0), score("p", "ppl", 10, 8, 125.0), score("a", "n", 1, 1, 100, False)]
    assert pipeline.retention_against(layout, control) == pytest.approx((100 * 0.4 / 0.6 + 100 * 8 / 20) / 2)
    control[0]["retention"] = 0.0  # the control scored 0: no ratio
    assert pipeline.retention_against(layout, control) is None


def test_the_table_reads_the_suites_own_tasks():
    recipe = pipeline.load()
    row = lambda name, value: {  # noqa: E731
        "layout": name, "active_heads": "9/9", "kv_bytes_per_token": 100, "retention": 90.0,
        "retention_vs_control": 95.0, "ppl_converted": dict.fromkeys(text.HELDOUT_TEXTS, 4.0),
        "ppl_tuned": dict.fromkeys(text.HELDOUT_TEXTS, 2.0),
        "eval": [score("mytask", "f1", 0.5, value, 90.0), score("mytask", "other", 1, 2, 50.0, False)]}
    result = {"source": "src", "source_kv_bytes_per_token": 100, "source_query_heads": 9,
              "source_ppl": dict.fromkeys(text.HELDOUT_TEXTS, 1.0), "control": row("source, tuned", 0.25),
              "rows": [row("dha", 0.125)], "recipe": recipe.model_dump(mode="json"),
              "tune": recipe.tune_recipe("m", "all", "out").model_dump(mode="json")}
    lines = pipeline.table(result).splitlines()
    assert lines[2].count("mytask") == 1 and "mytask f1" in lines[2] and "other" not in lines[2]
    assert lines[4].startswith("| source | 9/9 | 100 | 1.00 | 1.00 | 1.00 | 0.5 | 100 | — |")
    assert lines[5].startswith("| source, tuned | 9/9 | 100 | 4.00 → 2.00 | ")
    assert lines[6] == "| dha | 9/9 | 100 | " + " | ".join(["4.00 → 2.00 (×2.00, ×1.00)"] * 3) + " | 0.125 | 90.0 | 95.0 |"
