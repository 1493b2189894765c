"""The one checkpoint writer: what every rehead checkpoint folder holds, whichever stage made its weights.

    weights (safetensors shards + index)    written by the stage: convert streams them, tune saves a model
    config.json                             the layout's architecture and auto_map
    configuration_*.py, modeling_*.py       the layout's files: it loads with trust_remote_code without rehead
    tokenizer, generation config, licence   from the checkpoint it came from (or the tokenizer given)
    rehead.json                             the provenance (rehead.provenance)
"""

import json
from pathlib import Path

import torch

from rehead import families
from rehead.checkpoint import copy_side_files
from rehead.files import atomic_output
from rehead.layouts import BY_MODEL_TYPE
from rehead.provenance import Provenance

# PreTrainedConfig's task and output settings: noise in a causal LM's config.json
GENERIC_KEYS = ("_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
                "output_attentions", "output_hidden_states", "problem_type", "return_dict", "torch_dtype")


def layout_of(config) -> str | None:
    """The rehead layout of a config (object or dict), or None for a stock one."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    layout = BY_MODEL_TYPE.get(model_type)
    return layout.name if layout else None


def finish(folder: Path, config: dict, provenance: Provenance, origin: Path | None = None, tokenizer=None) -> None:
    """Completes ``folder``, whose weights are written: config.json, the layout's files, the side files of
    ``origin`` (or ``tokenizer`` where ``origin`` has none), and rehead.json."""
    config = {k: v for k, v in config.items() if k not in GENERIC_KEYS}
    layout = BY_MODEL_TYPE.get(config.get("model_type"))
    if layout is not None:
        config.update(architectures=[layout.model_class.__name__], auto_map=layout.auto_map)
        for path in layout.files:
            (folder / path.name).write_text(path.read_text())
    families.write_back(folder, config)  # a stock output of a source family that fuses tensors (Phi-3)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if origin is not None:
        copy_side_files(origin, folder)
    if tokenizer is not None and not (folder / "tokenizer_config.json").exists():
        tokenizer.save_pretrained(folder)
    provenance.save(folder)


def save_model(model, out: Path, provenance: Provenance, origin: Path | None = None, tokenizer=None,
               state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False,
               max_shard_size: str = "2GB") -> Path:
    """Writes a loaded ``model`` (or ``state_dict`` for its architecture) to ``out`` atomically."""
    out = Path(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        finish(tmp, json.loads((tmp / "config.json").read_text()), provenance, origin, tokenizer)
    return out
