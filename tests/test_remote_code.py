"""A converted checkpoint loads with trust_remote_code on a machine where rehead is not installed."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import logits

from rehead.convert import convert

BLOCK_REHEAD = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoRehead(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rehead" or name.startswith("rehead."):
                raise ImportError("rehead is not installed here")

    sys.meta_path.insert(0, NoRehead())
    """
)

LOAD_AND_GENERATE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    try:
        import rehead
        raise SystemExit("rehead was importable")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    print(json.dumps({"class": type(model).__name__, "logits": logits[0, -1].tolist(),
                      "new_tokens": generated.shape[1] - ids.shape[1]}))
    """
)


LAYOUTS = {
    "moh": ("MoHForCausalLM", dict(to="moh", active_heads=4, shared_heads=2, router="learned")),
    "dha": ("DHAForCausalLM", dict(to="dha", k_budget=0.5, v_budget=1.0)),
    "gda": ("GDAForCausalLM", dict(to="gda", ratio=3, subln=True)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_checkpoint_loads_without_rehead(tiny, tmp_path, calib_file, layout):
    model_class, options = LAYOUTS[layout]
    out = convert(tiny("gqa"), tmp_path / layout, calib=str(calib_file), calib_tokens=512, calib_seq_len=128,
                  **options)
    ids = [[5, 17, 99, 3, 250, 42, 7]]
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_REHEAD + LOAD_AND_GENERATE, str(out), json.dumps(ids)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == model_class and report["new_tokens"] == 6
    here = logits(out, torch.tensor(ids))[0, -1]  # loaded through rehead's registration instead
    torch.testing.assert_close(torch.tensor(report["logits"]), here, atol=1e-5, rtol=1e-5)
