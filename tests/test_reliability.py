"""Bad input never yields a broken model, a lost file or a traceback (issue 23): each case asserts the exit
code, the message's key words and what is on disk afterwards."""

import json
from pathlib import Path

import pytest
import torch
from conftest import read_json
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


@pytest.mark.parametrize("where", ["model", "parent"])
def test_tune_refuses_an_output_dir_that_overlaps_the_model(tiny, tmp_path, calib_file, where):
    model = tiny("gqa")
    before = snapshot(model)
    out = model / "run" if where == "model" else tmp_path
    with pytest.raises(ReheadError, match="output_dir.*overlaps model"):
        tune(_recipe(tmp_path, model, calib_file, output_dir=str(out)))
    assert snapshot(model) == before
