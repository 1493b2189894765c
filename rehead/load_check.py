"""The load check of ``rehead push``: the checkpoint loads as its users will load it.

It runs in a fresh interpreter where rehead cannot be imported (trust_remote_code, no rehead, no
token in the environment, the Hub offline) and generates a few tokens.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from rehead.errors import ReheadError

LOAD_CHECK = textwrap.dedent(
    """
    import importlib.abc, json, sys, torch

    class NoRehead(importlib.abc.MetaPathFinder):  # load as a user without rehead installed would
        def find_spec(self, name, path=None, target=None):
            if name == "rehead" or name.startswith("rehead."):
                raise ImportError("rehead is not installed here")

    sys.meta_path.insert(0, NoRehead())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = tokenizer("The", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print("REHEAD_LOAD_CHECK", json.dumps({"class": type(model).__name__, "new_tokens": out.shape[1] - ids.shape[1]}))
    """
)


def load_check(folder: Path, timeout: float = 1800) -> dict:
    """Loads ``folder`` with trust_remote_code in a fresh interpreter where rehead cannot be imported, and
    generates a few tokens."""
    result = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(folder.resolve())], capture_output=True,
                            text=True, timeout=timeout, env={**_clean_env(), "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise ReheadError(f"{folder}: does not load as its users would (trust_remote_code, no rehead): {tail[0]}")
    lines = [line.partition("REHEAD_LOAD_CHECK ")[2] for line in result.stdout.splitlines() if "REHEAD_LOAD_CHECK " in line]
    if not lines:
        raise ReheadError(f"{folder}: the load check printed no result; its output ended with: {result.stdout[-300:]!r}")
    return json.loads(lines[-1])


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
