"""rehead push: the model card of each layout, and an upload through the real huggingface_hub client to a
local stand-in of the Hub."""

import json

import pytest
import yaml

from rehead.app.cli import main
from rehead.card import card
from rehead.convert import convert
from rehead.errors import ReheadError
from rehead.hub import files_to_upload, push

OPTIONS = {
    "moh": dict(to="moh", active_heads=4, shared_heads=2, router="learned"),
    "dha": dict(to="dha", k_budget=0.5, v_budget=1.0),
    "gda": dict(to="gda", ratio=3),
}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def converted(tiny, tmp_path, calib_file, layout: str):
    src = tiny("gqa")
    (src / "README.md").write_text("---\nlicense: mit\nbase_model: some-org/tiny-gqa\n---\nA tiny model.\n")
    return convert(src, tmp_path / layout, calib=str(calib_file), calib_tokens=512, calib_seq_len=128,
                   **OPTIONS[layout])


@pytest.mark.parametrize("layout", list(OPTIONS))
def test_card_of_each_layout(tiny, tmp_path, calib_file, layout):
    out = converted(tiny, tmp_path, calib_file, layout)
    text = str(card(out, "me/tiny-" + layout))
    meta = front_matter(text)
    assert meta["base_model"] == "some-org/tiny-gqa" and meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers" and meta["license"] == "mit"
    assert meta["tags"] == ["rehead", layout]
    body = text.split("---\n", 2)[2]
    assert f"to: {layout}" in body and 'from_pretrained("me/tiny-' + layout + '", trust_remote_code=True)' in body
    source_kv = json.loads((out / "rehead.json").read_text())["source"]["kv_cache_bytes_per_token_bf16"]
    if layout == "dha":  # keys halved, values kept: 75% of the source's cache
        assert f"{int(source_kv * 0.75):,} bytes per token in bf16, 75.0% of the source's {source_kv:,}" in body
    if layout == "moh":
        assert "Active heads: 4 of 6 per token (67%), router `learned`" in body and "ratio:" not in body
    if layout == "gda":
        assert "6 signal heads and 2 shared noise-control heads" in body and "active_heads" not in body


def test_card_carries_tuning_and_eval(tiny, tmp_path, calib_file):
    out = converted(tiny, tmp_path, calib_file, "moh")
    record = json.loads((out / "rehead.json").read_text())
    record["tune"] = {"recipe": {"optim": {"lr": 1e-4}}, "steps": 12, "tokens": 12288,
                      "eval": [{"step": 0, "eval_ppl": 50.0}, {"step": 12, "eval_ppl": 41.5}]}
    (out / "rehead.json").write_text(json.dumps(record))
    (out / "eval").mkdir()
    (out / "eval" / "report.md").write_text("| task | metric |\n|---|---|\n| rehead_cloze | acc |\n")
    text = str(card(out))
    assert "tuned" in front_matter(text)["tags"]
    assert "12 steps, 12,288 tokens" in text and "lr: 0.0001" in text and "step 12: 41.50" in text
    assert "| rehead_cloze | acc |" in text


def test_dry_run_touches_no_network_and_lists_the_files(tiny, tmp_path, calib_file, capsys, monkeypatch):
    out = converted(tiny, tmp_path, calib_file, "gda")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["push", str(out), "--repo", "me/tiny-gda", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("---\n") and "would upload" in printed
    for path in files_to_upload(out):
        assert f"  {path.relative_to(out).as_posix()}\n" in printed
    assert not (out / "README.md").exists()  # a dry run writes nothing


def test_push_uploads_every_file_byte_identical_and_survives_a_5xx(tiny, tmp_path, calib_file, fake_hub, caplog):
    out = converted(tiny, tmp_path, calib_file, "moh")
    fake_hub.fail["create"] = [503]  # rehead retries repo creation
    fake_hub.fail["commit"] = [500]  # huggingface_hub retries the commit
    result = push(out, "me/tiny-moh", private=True, message="first")
    stored = fake_hub.repos["me/tiny-moh"]
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in files_to_upload(out)}
    assert set(stored["files"]) == set(local) and "README.md" in local
    assert all(stored["files"][name] == data for name, data in local.items())
    assert stored["private"] is True and stored["commits"][0]["summary"] == "first"
    assert result["commit"] == f"{1:040x}"
    assert fake_hub.cards and fake_hub.cards[-1]["tags"] == ["rehead", "moh"]
    assert fake_hub.token not in caplog.text  # the token is never logged


def test_a_refused_token_says_so(tiny, tmp_path, calib_file, fake_hub, monkeypatch, capsys):
    out = converted(tiny, tmp_path, calib_file, "dha")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    code = main(["push", str(out), "--repo", "me/tiny-dha", "--no-load-check"])
    err = capsys.readouterr().err
    assert code == 2 and "401 Unauthorized" in err and "HF_TOKEN" in err and "Nothing reached the Hub" in err
    assert "hf_wrong_token" not in err
    assert "me/tiny-dha" not in fake_hub.repos


def test_a_persistent_5xx_fails_clearly_after_retries(tiny, tmp_path, calib_file, fake_hub):
    out = converted(tiny, tmp_path, calib_file, "gda")
    fake_hub.fail["create"] = [502, 502, 502]
    with pytest.raises(ReheadError, match=r"502 \(after retries\).*Nothing reached the Hub"):
        push(out, "me/tiny-gda", check_load=False)


def test_bad_input(tiny, tmp_path, calib_file, monkeypatch):
    out = converted(tiny, tmp_path, calib_file, "moh")
    with pytest.raises(ReheadError, match=r"--repo 'tiny-moh': give ORG/NAME"):
        push(out, "tiny-moh", dry_run=True)
    with pytest.raises(ReheadError, match="not a checkpoint"):
        push(tmp_path, "me/x", dry_run=True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    with pytest.raises(ReheadError, match="no Hugging Face token"):
        push(out, "me/x")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ReheadError, match=r"cannot be reached.*nothing was uploaded"):
        push(out, "me/x")
