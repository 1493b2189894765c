"""rehead pipeline: convert, tune, eval and card every layout of a source in one command."""

import json

import pytest

pytest.importorskip("lm_eval")

from rehead.app import pipeline  # noqa: E402
from rehead.errors import ReheadError  # noqa: E402


def test_the_pipeline_runs_every_stage_for_every_layout(tiny, tmp_path, monkeypatch):
    from rehead import text
    from rehead.eval import harness

    monkeypatch.setattr("rehead.sampled.cache_dir", lambda: tmp_path / "cache")  # the samples of this tiny source
    monkeypatch.setattr(harness.ResultCache, "__init__",
                        lambda self, root=None: setattr(self, "root", tmp_path / "eval-cache"))
    src = tiny("gqa")
    settings = pipeline.Settings(source=str(src), work=tmp_path / "work", calib_tokens=512, steps=2, micro_batch=2,
                                 seq_len=64, eval_tokens=256, limit=2, lr=1e-3)
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
    assert settings.train == {"shakespeare": 1, "pydoc": 1, "self": 1}
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


def test_an_existing_work_folder_needs_overwrite(tiny, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "something").write_text("x")
    with pytest.raises(ReheadError, match="--overwrite"):
        pipeline.run(pipeline.Settings(source=str(tiny("gqa")), work=tmp_path / "work"))
