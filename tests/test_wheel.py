"""The wheel is the repository: built and installed non-editable, rehead runs without a checkout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(list(map(str, args)), capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert result.returncode == 0, f"{args}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the folder the wheel was installed into, the environment that uses it) — dependencies are the test
    environment's; nothing of the checkout is on the path."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", ROOT,
        cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("rehead-*.whl")
    run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", tmp / "site", wheel, cwd=tmp, env=env)
    return tmp / "site", {**env, "PYTHONPATH": str(tmp / "site")}


def test_the_wheel_holds_the_package_data(installed):
    site, _ = installed
    assert sorted(p.name for p in (site / "rehead" / "eval" / "tasks").glob("*.yaml")) == [
        "rehead_cloze.yaml", "rehead_pydoc_ppl.yaml", "rehead_shakespeare_ppl.yaml"]
    shipped = {p.relative_to(site / "rehead" / "recipes").as_posix() for p in (site / "rehead" / "recipes").rglob("*.yaml")}
    in_repo = {p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml")}
    assert shipped == in_repo and "smollm2-135m-moh.yaml" in shipped
    assert not (site / "convert").exists() and not (site / "eval").exists()  # no top-level stage modules


def test_the_installed_wheel_evaluates_and_tunes_by_recipe_name(installed, tiny, calib_file, tmp_path):
    site, env = installed
    where = run(sys.executable, "-c", "import rehead; print(rehead.__file__)", cwd=tmp_path, env=env).stdout
    assert where.strip().startswith(str(site))  # the wheel, not the checkout
    rehead = [sys.executable, "-m", "rehead"]
    src = tiny("gqa")
    run(*rehead, "eval", src, "--baseline", src, "--suite", "offline", "--limit", "2", "--out", tmp_path / "ev",
        cwd=tmp_path, env={**env, "REHEAD_CACHE": os.environ.get("REHEAD_CACHE", str(Path.home() / ".cache/rehead"))})
    assert (tmp_path / "ev" / "report.md").is_file()

    listed = run(*rehead, "recipes", cwd=tmp_path, env=env).stdout
    assert "smollm2-135m-moh" in listed and "accelerate/fsdp2-8gpu" in listed
    run(*rehead, "tune", "smollm2-135m-moh", f"model={src}", f"teacher={src}", f"data.train={calib_file}",
        "data.eval=null", "data.seq_len=32", "train.max_steps=1", "train.micro_batch=1", f"output_dir={tmp_path / 'run'}",
        cwd=tmp_path, env=env)
    assert (tmp_path / "run" / "model" / "rehead.json").is_file()
    run(*rehead, "recipes", "cp", "smollm2-135m-moh", tmp_path / "mine.yaml", cwd=tmp_path, env=env)
    assert (tmp_path / "mine.yaml").read_text() == (ROOT / "recipes" / "smollm2-135m-moh.yaml").read_text()
