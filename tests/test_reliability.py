"""Bad input never yields a broken model, a lost file or a traceback (issue 23): each case asserts the exit
code, the message's key words and what is on disk afterwards."""

import json
from pathlib import Path

import pytest
import torch
from conftest import interruptible, read_json
from safetensors.torch import load_file, save_file

from rehead.app.cli import main
from rehead.errors import ReheadError
from rehead.tune import load, tune


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(map(str, argv)))
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: what must be unchanged after a refusal."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_tensors(folder: Path, change) -> None:
    """Rewrites ``folder``'s model.safetensors with ``change(tensors)`` applied (in place)."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder: Path, **values) -> None:
    config = read_json(folder / "config.json")
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


def one_line(err: str) -> bool:
    """rehead said one line (the tiny fixtures' own progress bars aside) and showed no traceback."""
    return len([line for line in err.splitlines() if line.startswith("rehead ")]) == 1 and "Traceback" not in err


def nothing_written(parent: Path, name: str = "out") -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.partial-*"))


# ---- the output and the source ------------------------------------------------------------------
def test_an_output_that_contains_the_source_is_refused_and_the_source_kept(tiny, tmp_path, capsys):
    src = tiny("gqa")  # tmp_path/src-gqa-0: OUT = tmp_path holds it
    (tmp_path / "beside.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "convert", src, tmp_path, "--to", "mha", "--overwrite")
    assert code == 2 and "contains the source" in err and "delete" in err
    assert snapshot(tmp_path) == before


def test_an_output_inside_the_source_is_refused(tiny, tmp_path, capsys):
    src = tiny("gqa")
    before = snapshot(src)
    code, err = run_cli(capsys, "convert", src, src / "converted", "--to", "mha")
    assert code == 2 and "inside the source" in err
    assert snapshot(src) == before


def test_the_output_equal_to_the_source_is_refused(tiny, tmp_path, capsys):
    src = tiny("gqa")
    before = snapshot(src)
    code, err = run_cli(capsys, "convert", src, src, "--to", "mha", "--overwrite")
    assert code == 2 and "is the source" in err and snapshot(src) == before


# ---- the source's tensors against its config ----------------------------------------------------
@pytest.mark.parametrize("flags", [["--to", "mha"], ["--to", "moh", "--shared", "first", "--active-heads", "4",
                                                      "--shared-heads", "2"]])
def test_a_tensor_of_another_shape_than_its_config_is_refused(tiny, tmp_path, capsys, flags):
    src = tiny("gqa")
    edit_tensors(src, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.randn(32, 64)}))
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", *flags)
    assert code == 2 and "model.layers.0.self_attn.q_proj.weight has shape [32, 64]" in err and "[48, 48]" in err
    assert nothing_written(tmp_path)


def test_a_missing_tensor_is_refused(tiny, tmp_path, capsys):
    src = tiny("gqa")
    edit_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")
    assert code == 2 and "lack model.layers.1.mlp.up_proj.weight" in err and nothing_written(tmp_path)


def test_a_tensor_the_config_does_not_have_is_refused(tiny, tmp_path, capsys):
    src = tiny("gqa")
    edit_tensors(src, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}))
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")
    assert code == 2 and "model.layers.0.self_attn.q_norm.weight" in err and "does not have" in err
    assert nothing_written(tmp_path)


def test_more_layers_in_the_config_than_in_the_weights_is_refused(tiny, tmp_path, capsys):
    src = tiny("gqa")
    edit_config(src, num_hidden_layers=3)
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")
    assert code == 2 and "model.layers.2." in err and nothing_written(tmp_path)


# ---- quantized sources --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bitsandbytes", "gptq"])
def test_a_quantized_checkpoint_is_refused_by_its_config(tiny, tmp_path, capsys, method):
    src = tiny("gqa")
    edit_config(src, quantization_config={"quant_method": method, "bits": 4})
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")
    assert code == 2 and f"quant_method {method!r}" in err and "Dequantize first" in err
    assert nothing_written(tmp_path)


def test_packed_integer_weights_are_refused_by_their_dtype(tiny, tmp_path, capsys):
    src = tiny("gqa")

    def pack(tensors):
        for name in [n for n in tensors if n.endswith("proj.weight")]:
            tensors[name] = torch.randint(0, 255, tensors[name].shape, dtype=torch.uint8)

    edit_tensors(src, pack)
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")
    assert code == 2 and "hold U8 values" in err and "Dequantize first" in err and nothing_written(tmp_path)


# ---- tune resumes only its own run --------------------------------------------------------------
def _recipe(tmp_path, model, calib_file, **values):
    base = {"model": str(model), "data.train": str(calib_file), "data.eval": None, "data.seq_len": 32,
            "train.max_steps": 2, "train.save_every": 1, "train.micro_batch": 2, "output_dir": str(tmp_path / "run"),
            "log": "none"}
    return load(None, [], {**base, **values})


def test_tune_refuses_to_resume_a_checkpoint_of_another_model(tiny, tmp_path, calib_file, capsys):
    first, other = tiny("gqa"), tiny("gqa", seed=1)
    tune(_recipe(tmp_path, first, calib_file))
    before = snapshot(tmp_path / "run")
    recipe = tmp_path / "other.yaml"
    recipe.write_text(_recipe(tmp_path, other, calib_file, **{"train.max_steps": 4}).dump())
    code, err = run_cli(capsys, "tune", recipe)
    assert code == 2 and "another run" in err and f"model {str(first)!r}" in err and "model, model_files" in err
    assert snapshot(tmp_path / "run") == before  # nothing resumed, the run's recipe.yaml and model kept


def test_tune_refuses_a_checkpoint_of_the_same_folder_rewritten(tiny, tmp_path, calib_file):
    model = tiny("gqa")
    tune(_recipe(tmp_path, model, calib_file))
    tiny("gqa", seed=3).rename(tmp_path / "new")
    for path in (tmp_path / "new").iterdir():  # the same model folder, now other weights
        path.replace(model / path.name)
    with pytest.raises(ReheadError, match=r"\(other files\).*differs in model_files"):
        tune(_recipe(tmp_path, model, calib_file, **{"train.max_steps": 4}))


def test_tune_refuses_a_checkpoint_of_other_data(tiny, tmp_path, calib_file):
    model = tiny("gqa")
    tune(_recipe(tmp_path, model, calib_file))
    with pytest.raises(ReheadError, match="differs in data, global_batch"):
        tune(_recipe(tmp_path, model, calib_file, **{"data.seq_len": 16, "train.micro_batch": 4,
                                                     "train.max_steps": 4}))


def test_tune_resumes_its_own_run_with_more_steps(tiny, tmp_path, calib_file):
    model = tiny("gqa")
    tune(_recipe(tmp_path, model, calib_file))
    result = tune(_recipe(tmp_path, model, calib_file, **{"train.max_steps": 3, "optim.lr": 1e-4}))
    assert result.steps == 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_a_checkpoint_that_records_no_run_is_resumed_only_when_named(tiny, tmp_path, calib_file, caplog):
    model = tiny("gqa")
    tune(_recipe(tmp_path, model, calib_file))
    last = tmp_path / "run" / "checkpoints" / "step-00000002"
    state = read_json(last / "trainer_state.json")
    del state["run"]  # as an older rehead wrote it
    (last / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ReheadError, match="without recording its run.*give resume: that folder"):
        tune(_recipe(tmp_path, model, calib_file, **{"train.max_steps": 3}))
    with caplog.at_level("WARNING", logger="rehead.tune"):
        result = tune(_recipe(tmp_path, model, calib_file, **{"train.max_steps": 3, "resume": str(last)}))
    assert result.steps == 3 and "does not record its run" in caplog.text


@pytest.mark.parametrize("where", ["model", "parent"])
def test_tune_refuses_an_output_dir_that_overlaps_the_model(tiny, tmp_path, calib_file, where):
    model = tiny("gqa")
    before = snapshot(model)
    out = model / "run" if where == "model" else tmp_path
    with pytest.raises(ReheadError, match="output_dir.*overlaps model"):
        tune(_recipe(tmp_path, model, calib_file, output_dir=str(out)))
    assert snapshot(model) == before


# ---- every error is one line: bad configs and shards ---------------------------------------------
@pytest.mark.parametrize("command", ["convert", "perplexity"])
def test_a_config_that_is_not_an_object_is_one_line(tiny, tmp_path, capsys, command):
    src = tiny("gqa")
    (src / "config.json").write_text("[1, 2]")
    argv = [command, src, tmp_path / "out", "--to", "mha"] if command == "convert" else [command, src]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "holds a JSON list, not an object" in err and one_line(err)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["convert", "perplexity"])
def test_a_head_count_that_is_a_string_is_one_line(tiny, tmp_path, capsys, command):
    src = tiny("gqa")
    edit_config(src, num_attention_heads="6")
    argv = [command, src, tmp_path / "out", "--to", "mha"] if command == "convert" else [command, src]
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "num_attention_heads = '6': must be a positive integer" in err
    assert one_line(err) and nothing_written(tmp_path)


def _sharded(tiny) -> Path:
    """A tiny source as two shards and an index."""
    src = tiny("gqa")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    half = {"a": names[: len(names) // 2], "b": names[len(names) // 2 :]}
    for part, chosen in half.items():
        save_file({n: tensors[n] for n in chosen}, src / f"model-{part}.safetensors", metadata={"format": "pt"})
    (src / "model.safetensors").unlink()
    index = {"weight_map": {n: f"model-{part}.safetensors" for part, chosen in half.items() for n in chosen}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src


def test_an_index_that_maps_a_tensor_to_a_shard_without_it_is_one_line(tiny, tmp_path, capsys):
    src = _sharded(tiny)
    index = read_json(src / "model.safetensors.index.json")
    moved = next(n for n, shard in index["weight_map"].items() if shard == "model-a.safetensors")
    index["weight_map"][moved] = "model-b.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")
    assert code == 2 and f"model-b.safetensors: lacks {moved}" in err and nothing_written(tmp_path)


def test_a_shard_name_that_leaves_the_folder_is_refused_before_it_is_opened(tiny, tmp_path, capsys, monkeypatch):
    src = _sharded(tiny)
    (src / "model-b.safetensors").rename(tmp_path / "outside.safetensors")
    index = read_json(src / "model.safetensors.index.json")
    index["weight_map"] = {n: ("../outside.safetensors" if s == "model-b.safetensors" else s)
                           for n, s in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    from rehead import checkpoint

    opened = []  # every file the reader opens: through safetensors, or with a plain read
    real_safe_open = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open", lambda path, **k: opened.append(Path(path).name)
                        or real_safe_open(path, **k))
    monkeypatch.setattr(checkpoint, "open", lambda path, *a: opened.append(Path(path).name) or open(path, *a),
                        raising=False)
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")
    assert code == 2 and "outside the checkpoint folder (../outside.safetensors)" in err
    assert "outside.safetensors" not in opened and nothing_written(tmp_path)


@pytest.mark.parametrize("command", ["convert", "perplexity"])
def test_an_unknown_device_is_one_line(tiny, tmp_path, capsys, command):
    src = tiny("gqa")
    argv = [command, src, tmp_path / "out", "--to", "mha"] if command == "convert" else [command, src]
    code, err = run_cli(capsys, *argv, "--device", "tpu")
    assert code == 2 and "--device 'tpu': not a device" in err and nothing_written(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["perplexity", "M", "--tokens", "0"], "argument --tokens: 0: must be at least 1"),
    (["perplexity", "M", "--seq-len", "1"], "argument --seq-len: 1: must be at least 2"),
    (["pipeline", "--steps", "0"], "argument --steps: 0: must be at least 1"),
    (["pipeline", "--limit", "x"], "argument --limit: 'x': give a whole number"),
    (["eval", "M", "--suite", "offline", "--num-fewshot", "-1"], "argument --num-fewshot: -1: must be at least 0"),
])
def test_counts_out_of_range_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_pipeline_settings_are_checked_in_the_flags_names_before_any_work(tmp_path):
    from rehead.app import pipeline

    def run(**values):
        pipeline.run(pipeline.load(values={"work": str(tmp_path / "work"), **values}))

    with pytest.raises(ReheadError, match=r"tune section: .*max_steps"):
        run(**{"tune.train.max_steps": 0})
    with pytest.raises(ReheadError, match=r"eval\.limit.*greater than 0"):
        run(**{"eval.limit": -3})
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ReheadError, match="--work .*file: is a file"):
        run(work=str(tmp_path / "file"))
    assert not (tmp_path / "work").exists() and (tmp_path / "file").read_text() == "mine"


# ---- tune and eval: their outputs and arguments -------------------------------------------------
def test_tune_with_an_output_dir_that_is_a_file_is_one_line(tiny, tmp_path, calib_file, capsys):
    model = tiny("gqa")
    (tmp_path / "run").write_text("mine")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tmp_path, model, calib_file).dump())
    code, err = run_cli(capsys, "tune", recipe)
    assert code == 2 and "output_dir" in err and "is a file" in err and (tmp_path / "run").read_text() == "mine"


def test_an_override_that_is_not_yaml_is_one_line(tiny, tmp_path, calib_file, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tmp_path, tiny("gqa"), calib_file).dump())
    code, err = run_cli(capsys, "tune", recipe, "optim.betas=[0.9,")
    assert code == 2 and "override 'optim.betas=[0.9,': the value is not valid YAML" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def no_scoring(monkeypatch):
    """eval's harness fails the test if it is reached: the refusals below come before any scoring."""
    pytest.importorskip("lm_eval")
    from rehead.eval import harness

    monkeypatch.setattr(harness, "run", lambda *a, **k: pytest.fail("a model was scored before the refusal"))


def test_eval_with_an_out_that_is_a_file_is_refused_before_scoring(tiny, tmp_path, capsys, no_scoring):
    src = tiny("gqa")
    (tmp_path / "report").write_text("mine")
    code, err = run_cli(capsys, "eval", src, "--baseline", src, "--suite", "offline", "--out", tmp_path / "report")
    assert code == 2 and "--out" in err and "is a file" in err and (tmp_path / "report").read_text() == "mine"


def test_eval_with_a_baseline_of_other_shapes_is_refused_before_scoring(tiny, tmp_path, capsys, no_scoring):
    candidate, baseline = tiny("gqa"), tiny("gqa")
    edit_tensors(baseline, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.randn(48, 40)}))
    code, err = run_cli(capsys, "eval", candidate, "--baseline", baseline, "--suite", "offline",
                        "--out", tmp_path / "ev")
    assert code == 2 and "baseline" in err and "down_proj.weight has shape [48, 40]" in err
    assert not (tmp_path / "ev").exists()


def test_a_model_missing_a_tensor_is_not_loaded_with_random_values(tiny, tmp_path, capsys):
    src = tiny("gqa")
    edit_tensors(src, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    code, err = run_cli(capsys, "perplexity", src, "--tokens", "64", "--seq-len", "32")
    assert code == 2 and "lack model.layers.0.mlp.up_proj.weight" in err


# ---- an unforeseen error: one line, and the traceback kept ----------------------------------------
def test_an_unforeseen_error_is_one_line_and_its_traceback_is_kept(tmp_path, capsys, monkeypatch):
    from rehead.app import cli

    monkeypatch.setenv("REHEAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_recipes", lambda args: {}["no such key"])
    code, err = run_cli(capsys, "recipes")
    assert code == 1 and one_line(err)
    assert "unexpected error: KeyError: 'no such key'" in err
    saved = list((tmp_path / "cache" / "errors").glob("recipes-*.txt"))
    assert len(saved) == 1 and str(saved[0]) in err and "Traceback" in saved[0].read_text()
    code, err = run_cli(capsys, "-v", "recipes")
    assert code == 1 and "Traceback (most recent call last)" in err and 'KeyError' in err


# ---- non-finite weights -------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--to", "moh", "--shared", "first", "--active-heads", "4", "--shared-heads", "2"],
                                   ["--to", "dha", "--kv-budget", "0.5", "--refine-steps", "0"]])
def test_a_source_with_nan_weights_is_refused_naming_the_tensor(tiny, tmp_path, capsys, calib_file, flags):
    src = tiny("gqa")

    def poison(tensors):
        tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
        tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("inf")

    edit_tensors(src, poison)
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", *flags, "--calib", calib_file,
                        "--calib-tokens", "1024", "--calib-seq-len", "128")
    assert code == 2 and "tensor model.layers.1.self_attn.k_proj.weight holds 2 NaN or infinite values" in err
    assert one_line(err) and nothing_written(tmp_path)


# ---- outputs: the umask's mode, and a refused push leaves the folder as it was -------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_an_output_folder_gets_the_umasks_mode(tiny, tmp_path, umask, mode):
    import os
    import stat

    from rehead.convert import convert

    src = tiny("gqa")
    previous = os.umask(umask)
    try:
        out = convert(src, tmp_path / "out", to="mha")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == mode & 0o666


@pytest.mark.parametrize("readme", [b"my own notes\n", None])
def test_a_refused_push_leaves_the_folder_as_it_was(tiny, tmp_path, capsys, monkeypatch, fake_hub, readme):
    from rehead.convert import convert

    out = convert(tiny("gqa"), tmp_path / "moh", to="moh", shared="first", active_heads=4, shared_heads=2)
    if readme is not None:
        (out / "README.md").write_bytes(readme)
    before = snapshot(out)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token")
    code, err = run_cli(capsys, "push", out, "--repo", "me/tiny", "--no-load-check")
    assert code == 2 and "401 Unauthorized" in err and snapshot(out) == before
    fake_hub.fail["commit"] = [403]
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    code, err = run_cli(capsys, "push", out, "--repo", "me/tiny", "--no-load-check")
    assert code == 2 and "403" in err and snapshot(out) == before


def test_an_interrupted_push_leaves_the_folder_as_it_was(tiny, tmp_path, capsys, monkeypatch, fake_hub):
    from rehead import hub
    from rehead.convert import convert

    out = convert(tiny("gqa"), tmp_path / "moh", to="moh", shared="first", active_heads=4, shared_heads=2)
    (out / "README.md").write_text("mine")
    before = snapshot(out)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "_upload", interrupted)
    code, err = run_cli(capsys, "push", out, "--repo", "me/tiny", "--no-load-check")
    assert code == 130 and "interrupted" in err and snapshot(out) == before


# ---- the tokenizer of a DeciLM export -------------------------------------------------------------
def test_the_tokenizer_of_a_deci_export_loads_without_a_prompt(tiny, tmp_path):
    import subprocess
    import sys

    from rehead.card import card
    from rehead.convert import convert

    out = convert(tiny("gqa", intermediate_size=256), tmp_path / "deci", to="dha", kv_budget=1.0, export="deci")
    load = f"from transformers import AutoTokenizer; print(type(AutoTokenizer.from_pretrained({str(out)!r}"
    with_rehead = subprocess.run([sys.executable, "-c", f"import rehead; {load})).__name__)"], capture_output=True,
                                 text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert with_rehead.returncode == 0 and "Do you wish" not in with_rehead.stdout + with_rehead.stderr
    # without rehead, transformers consults the config's auto_map: the card's snippet says trust_remote_code
    assert 'AutoTokenizer.from_pretrained("me/deci", trust_remote_code=True)' in str(card(out, "me/deci"))
    without = subprocess.run([sys.executable, "-c", f"{load}, trust_remote_code=True)).__name__)"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert without.returncode == 0 and "Do you wish" not in without.stdout + without.stderr


# ---- provenance: the sha256 recorded for a Hub-cache file -----------------------------------------
def test_the_sha256_of_a_hub_cache_file_is_its_content_hash_for_every_kind_of_blob(tmp_path):
    import hashlib

    from rehead.checkpoint import sha256_file

    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    small, weights = b'{"model_type": "llama"}', b"\0" * 4096
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(small) + small).hexdigest()  # a regular file's blob: its git SHA-1
    lfs_sha256 = hashlib.sha256(weights).hexdigest()  # an LFS file's blob: its sha256
    for name, data, file in [(git_sha1, small, "config.json"), (lfs_sha256, weights, "model.safetensors")]:
        (repo / "blobs" / name).write_bytes(data)
        (repo / "snapshots" / "c0ffee" / file).symlink_to(Path("../../blobs") / name)
    assert sha256_file(repo / "snapshots" / "c0ffee" / "config.json") == hashlib.sha256(small).hexdigest()
    assert sha256_file(repo / "snapshots" / "c0ffee" / "model.safetensors") == lfs_sha256


# ---- the earlier by-hand rows of BENCHMARKS.md "Reliability", now held by tests --------------------
def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from rehead.app import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(cli, "cmd_recipes", full)
    code, err = run_cli(capsys, "recipes")
    assert code == 2 and "the disk is full (No space left on device) writing" in err and one_line(err)


def test_a_full_disk_in_safetensors_words_is_one_line(capsys, monkeypatch):
    from safetensors import SafetensorError

    from rehead.app import cli

    def full(args):  # what safetensors raises from save_file on a full disk (seen under a real tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cli, "cmd_recipes", full)
    code, err = run_cli(capsys, "recipes")
    assert code == 2 and "the disk is full (No space left on device)" in err and one_line(err)


def test_smaller_mistakes_are_one_line(tiny, tmp_path, capsys, calib_file):
    (tmp_path / "file.txt").write_text("x")
    code, err = run_cli(capsys, "inspect", tmp_path / "file.txt")
    assert code == 2 and "is a file; give the checkpoint's folder" in err
    code, err = run_cli(capsys, "pipeline", "--layouts", "xyz", "--work", tmp_path / "work")
    assert code == 2 and "unknown layout(s) xyz; choose from moh, dha, gda" in err and not (tmp_path / "work").exists()
    src = tiny("gqa")
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "moh", "--calib", tmp_path / "nosuch.txt")
    assert code == 2 and "no such file or folder" in err and nothing_written(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tmp_path, src, calib_file, resume=str(tmp_path)).dump())
    code, err = run_cli(capsys, "tune", recipe)
    assert code == 2 and "is not a rehead tune checkpoint (no trainer_state.json in it)" in err
    with pytest.raises(SystemExit) as stopped:
        main(["convert", str(src), str(tmp_path / "out"), "--to", "xyz"])
    assert stopped.value.code == 2 and "invalid choice: 'xyz'" in capsys.readouterr().err


# ---- typos, other tools' formats, Ctrl-C, a full disk ---------------------------------------------
@pytest.mark.parametrize("argv, said", [
    (["convrt", "SRC", "OUT"], "invalid choice: 'convrt'"),
    (["convert", "SRC", "OUT", "--to", "mohh"], "invalid choice: 'mohh'"),
    (["convert", "SRC", "OUT", "--to", "mha", "--dtype", "bf61"], "invalid choice: 'bf61'"),
    (["convert", "SRC", "OUT", "--to", "dha", "--kv-budgt", "0.5"], "unrecognized arguments: --kv-budgt 0.5"),
    (["inspect", "SRC", "--jsn"], "unrecognized arguments: --jsn"),
    (["tune", "r.yaml", "--max-steps", "3"], "unrecognized arguments: --max-steps 3"),
])
def test_a_typo_is_refused_with_the_closest_name(argv, said, capsys):
    hint = {"convrt": "did you mean convert?", "mohh": "did you mean moh?", "bf61": "did you mean bf16?",
            "--kv-budgt": "did you mean --kv-budget?", "--jsn": "did you mean --json?",
            "--max-steps": "recipe values are KEY=VALUE overrides, e.g. train.max_steps="}
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and said in err
    assert next(h for typo, h in hint.items() if typo in argv) in err
    assert f"rehead {argv[0]}: error" in err or argv[0] == "convrt"  # the command's own usage, not rehead's


def test_a_revision_of_a_local_folder_is_refused(tiny, tmp_path, capsys):
    src = tiny("gqa")
    code, err = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha", "--revision", "main")
    assert code == 2 and "revision 'main'" in err and "is a local folder, which has no revisions" in err
    assert nothing_written(tmp_path)


def _gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    return path


FORMATS = {  # name: (build it under a folder, the words that name it and what to do)
    "gguf file": (lambda d: _gguf(d / "model.Q4_K_M.gguf"), ["a GGUF file", "gguf_file='model.Q4_K_M.gguf'"]),
    "gguf folder": (lambda d: _gguf(d / "model.gguf").parent, ["no config.json: a GGUF file"]),
    "peft adapter": (lambda d: (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/base"})) and d,
        ["a PEFT adapter of org/base", "merge_and_unload"]),
    "meta original": (lambda d: [(d / "params.json").write_text("{}"), (d / "consolidated.00.pth").write_bytes(b"")]
                      and d, ["Meta's original checkpoint format", "convert_llama_weights_to_hf"]),
    "tensorflow": (lambda d: (d / "tf_model.h5").write_bytes(b"\x89HDF") and d, ["TensorFlow weights", "from_tf"]),
    "mergekit yaml": (lambda d: (d / "merge.yml").write_text("merge_method: slerp\n") and d / "merge.yml",
                      ["a mergekit config is run with mergekit first"]),
    "safetensors file": (lambda d: save_file({"x": torch.zeros(1)}, d / "model.safetensors") or d / "model.safetensors",
                         ["a safetensors file; give the folder that holds it"]),
    "training checkpoint": (lambda d: [(d / "optimizer.bin").write_bytes(b""), (d / "model.safetensors").write_bytes(b"")]
                            and d, ["a training checkpoint (optimizer state)"]),
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_another_tools_format_is_named_with_what_to_do(kind, tiny, tmp_path, capsys):
    build, words = FORMATS[kind]
    folder = tmp_path / "given"
    folder.mkdir()
    given = build(folder)
    if kind == "tensorflow":  # a transformers config beside TF weights: the weights are what is foreign
        (folder / "config.json").write_bytes((tiny("gqa") / "config.json").read_bytes())
    code, err = run_cli(capsys, "convert", given, tmp_path / "out", "--to", "mha")
    assert code == 2 and one_line(err) and all(w in err for w in words), err
    assert nothing_written(tmp_path)


def test_a_quantized_mlx_checkpoint_and_an_mla_export_are_refused_as_sources(tiny, tmp_path, capsys):
    mlx = tiny("gqa")
    edit_config(mlx, quantization={"group_size": 64, "bits": 4})
    code, err = run_cli(capsys, "convert", mlx, tmp_path / "out", "--to", "mha")
    assert code == 2 and "a quantized MLX checkpoint (quantization: 4 bits" in err and "--dequantize" in err
    deepseek = tiny("gqa")
    edit_config(deepseek, model_type="deepseek_v3")
    code, err = run_cli(capsys, "convert", deepseek, tmp_path / "out", "--to", "dha", "--kv-budget", "0.5")
    assert code == 2 and "'deepseek_v3' is not supported (already multi-head latent attention" in err
    assert "convert from the original model" in err and nothing_written(tmp_path)


INTERRUPTED_TUNE = """
import sys
from rehead.tune import loop
from rehead.app.cli import main
original = loop.Trainer.save_checkpoint
def announced(self, step, state):
    if step == 3:  # Ctrl-C comes while step 3's checkpoint is half-saved (written, not yet renamed)
        save_state = self.acc.save_state
        def halfway(folder):
            save_state(folder)
            print("saving 3", flush=True)
            sys.stdin.readline()
        self.acc.save_state = halfway
    final = original(self, step, state)
    print(f"saved {step}", flush=True)
    return final
loop.Trainer.save_checkpoint = announced
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_in_tune_keeps_the_last_checkpoint_and_the_same_command_resumes(tiny, tmp_path, calib_file):
    import signal
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tmp_path, tiny("gqa"), calib_file, **{"train.max_steps": 4}).dump())
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_TUNE, "tune", str(recipe)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    assert [proc.stdout.readline().strip() for _ in range(3)] == ["saved 1", "saved 2", "saving 3"]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / ".step-00000003.partial").is_dir()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; the last complete checkpoint" in err, err
    assert "step-00000002" in err and "run the same command to resume" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002"]  # no .partial
    assert not (tmp_path / "run" / "model").exists()
    result = tune(load(recipe))  # the same command again: steps 3 and 4 from step 2's state
    assert result.steps == 4 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert json.loads((checkpoints / "step-00000004" / "trainer_state.json").read_text())["step"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (a real full disk), where this machine lets the tests mount one (root); skipped elsewhere."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip() or 'not root'})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_under_a_real_conversion_leaves_nothing_and_a_rerun_works(tiny, tmp_path, small_disk, capsys):
    src = tiny("gqa", layers=4)
    assert (src / "model.safetensors").stat().st_size > 96 * 1024  # it cannot fit
    code, err = run_cli(capsys, "convert", src, small_disk / "out", "--to", "mha")
    assert code == 2 and one_line(err) and "the disk is full" in err and "nothing half-written was kept" in err
    assert list(small_disk.iterdir()) == []  # no output, no .partial folder
    code, _ = run_cli(capsys, "convert", src, tmp_path / "out", "--to", "mha")  # the same command elsewhere
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_full_disk_under_a_tune_checkpoint_says_so_and_keeps_no_partial(tiny, tmp_path, small_disk, calib_file,
                                                                         capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tmp_path, tiny("gqa", layers=4), calib_file, output_dir=str(small_disk / "run")).dump())
    code, err = run_cli(capsys, "tune", recipe)
    assert code == 2 and one_line(err) and "could not save the checkpoint of step 1" in err and "MiB are free" in err
    assert sorted(p.name for p in (small_disk / "run").rglob("*")) == ["checkpoints", "metrics.jsonl", "recipe.yaml"]


def test_calibration_flags_a_conversion_does_not_read_are_warned_about(tiny, tmp_path, capsys, caplog):
    src = tiny("gqa")
    with caplog.at_level("WARNING", logger="rehead.convert"):
        code, _ = run_cli(capsys, "convert", src, tmp_path / "mha", "--to", "mha", "--calib-tokens", "100")
    said = "--calib-tokens: this conversion (--to mha with these options) reads no calibration text"
    assert code == 0 and said in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rehead.convert"):
        code, _ = run_cli(capsys, "convert", src, tmp_path / "moh", "--to", "moh", "--calib-tokens", "256",
                          "--calib-seq-len", "64")
    assert code == 0 and "reads no calibration text" not in caplog.text  # MoH's learned router calibrates
