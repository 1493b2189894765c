"""Loading a checkpoint of any layout as a transformers model (no remote code: rehead registers its layouts)."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rehead.checkpoint import read_config
from rehead.errors import ReheadError
from rehead.sources import resolve
from rehead.validate import check_config

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # rehead's dtype names: torch's


def load(spec: str, dtype: str = "fp32", device: str = "cpu", attn: str = "sdpa", revision: str | None = None):
    """(model, tokenizer, source) for a built-in name, folder or hub id; the tokenizer may be None."""
    source = resolve(spec, revision)
    check_config(read_config(source.path), spec)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=getattr(torch, DTYPES[dtype]), attn_implementation=attn, trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReheadError(f"{spec}: could not be loaded as a causal LM ({type(e).__name__}: {e})") from None
    except RuntimeError as e:  # transformers reports tensors whose shapes differ from the config's this way
        raise ReheadError(f"{spec}: its weights do not fit its config.json (tensors of other shapes; "
                          f"{str(e).splitlines()[0]}); the weights and the config belong to different models") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values
        raise ReheadError(f"{spec}: the weights lack {', '.join(missing[:3])}"
                          f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}, which its config implies; "
                          "the download is incomplete or the config belongs to another model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.to(device).eval(), tokenizer, source
