"""A converted checkpoint loads with trust_remote_code on a machine where rehead is not installed."""

import pytest
import torch
from conftest import load_without_rehead, logits

from rehead.convert import convert

LAYOUTS = {
    "moh": ("MoHForCausalLM", dict(to="moh", active_heads=4, shared_heads=2, router="learned")),
    "dha": ("DHAForCausalLM", dict(to="dha", k_budget=0.5, v_budget=1.0)),
    "gda": ("GDAForCausalLM", dict(to="gda", ratio=3, subln=True)),
    "gda-diff-lambda": ("GDAForCausalLM", dict(to="gda", ratio=3, subln=True, lambda_="diff")),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_checkpoint_loads_without_rehead(tiny, tmp_path, calib_file, layout):
    model_class, options = LAYOUTS[layout]
    out = convert(tiny("gqa"), tmp_path / layout, calib=str(calib_file), calib_tokens=512, calib_seq_len=128,
                  **options)
    ids = [[5, 17, 99, 3, 250, 42, 7]]
    report = load_without_rehead(out, ids, tmp_path)
    assert report["class"] == model_class and report["new_tokens"] == 6 and report["static_equal"]
    here = logits(out, torch.tensor(ids))[0, -1]  # loaded through rehead's registration instead
    torch.testing.assert_close(torch.tensor(report["logits"]), here, atol=1e-5, rtol=1e-5)
