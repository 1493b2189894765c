"""Loading a checkpoint of any layout as a transformers model (no remote code: rehead registers its layouts)."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead.checkpoint import read_config
from rehead.errors import ReheadError
from rehead.sources import resolve

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # rehead's dtype names: torch's


def load(spec: str, dtype: str = "fp32", device: str = "cpu", attn: str = "sdpa", revision: str | None = None):
    """(model, tokenizer, source) for a built-in name, folder or hub id; the tokenizer may be None."""
    source = resolve(spec, revision)
    read_config(source.path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=getattr(torch, DTYPES[dtype]), attn_implementation=attn, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as e:
        raise ReheadError(f"{spec}: could not be loaded as a causal LM ({type(e).__name__}: {e})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.to(device).eval(), tokenizer, source
