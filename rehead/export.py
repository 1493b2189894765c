"""Writing a loaded model of any layout as a checkpoint folder in its layout's format.

The folder is what `rehead convert` writes: safetensors shards, config.json with auto_map, the
layout's configuration/modeling files (so it loads with trust_remote_code where rehead is not
installed), the tokenizer and licence files of the model it came from, and rehead.json.
"""

import json
from pathlib import Path

import torch

from rehead.checkpoint import atomic_output, copy_side_files
from rehead.layouts import BY_MODEL_TYPE


def layout_of(config) -> str | None:
    layout = BY_MODEL_TYPE.get(getattr(config, "model_type", None))
    return layout.name if layout else None


def save(model, out: Path, origin: Path | None, provenance: dict, tokenizer=None,
         state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False,
         max_shard_size: str = "2GB") -> Path:
    """Writes ``model`` (or ``state_dict`` for its architecture) to ``out`` atomically.

    ``origin``: the checkpoint folder the model was loaded from (tokenizer, licence, its rehead.json);
    ``provenance``: merged into the origin's rehead.json under its own keys.
    """
    out = Path(out)
    with atomic_output(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        layout = BY_MODEL_TYPE.get(getattr(model.config, "model_type", None))
        if layout is not None:
            config = json.loads((tmp / "config.json").read_text())
            config["auto_map"] = layout.auto_map
            config["architectures"] = [layout.model_class.__name__]
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for path in layout.files:
                (tmp / path.name).write_text(path.read_text())
        copied = copy_side_files(origin, tmp) if origin is not None else []
        if tokenizer is not None and not copied:
            tokenizer.save_pretrained(tmp)
        record = {}
        if origin is not None and (origin / "rehead.json").is_file():
            record = json.loads((origin / "rehead.json").read_text())
        record.update(provenance)
        (tmp / "rehead.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
