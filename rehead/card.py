"""The model card of a rehead checkpoint (or a transformers one): front matter for the Hub, what the layout
saves, the conversion and tuning recipes, the ``rehead eval`` table, a usage snippet."""

from pathlib import Path

import yaml

from rehead.checkpoint import read_config
from rehead.errors import ReheadError
from rehead.layouts import BY_MODEL_TYPE, layout_config
from rehead.provenance import Provenance


def check_folder(folder: Path) -> dict:
    """The folder's config; refuses anything that is not a transformers (or rehead) checkpoint."""
    if not folder.is_dir():
        raise ReheadError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ReheadError(f"{folder}: not a checkpoint (no config.json); give the folder rehead convert or tune wrote")
    config = read_config(folder)
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if "model_type" not in config or not weights:
        raise ReheadError(f"{folder}: not a transformers checkpoint (config.json without model_type, or no weights)")
    return config


def _savings(folder: Path, config: dict, record: Provenance | None) -> list[str]:
    from rehead.describe import describe

    try:
        info = describe(folder)
    except Exception:  # the card describes what it can
        info = None
    lines = []
    before = record.source.kv_cache_bytes_per_token_bf16 if record and record.source else None
    if info and before:
        after = info["kv_cache_bytes_per_token_bf16"]
        lines.append(f"- KV cache: {after:,} bytes per token in bf16, {100 * after / before:.1f}% of the source's "
                     f"{before:,}")
    layout = layout_config(config)
    if layout is not None:
        lines += layout.card_lines()
    if info:
        lines.append(f"- Parameters: {info['parameters']:,}")
    return lines


# conversion options that say how the input was read or the output stored, not what the model is
NOT_ON_CARD = ("revision", "tokenizer", "allow_pickle", "max_shard_gb", "check_identity", "overwrite", "device")


def _card_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None and k not in NOT_ON_CARD}


def card(folder: Path, repo: str | None = None):
    """The model card (huggingface_hub.ModelCard) of a rehead checkpoint or a transformers one."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = check_folder(folder)
    record = Provenance.load(folder)
    layout = BY_MODEL_TYPE.get(config.get("model_type"))
    layout_name = layout.name if layout else (record.layout if record and record.layout else config.get("model_type"))
    source = record.source if record and record.source else None
    tuned = record is not None and record.tune is not None
    tags = ["rehead", layout_name] + (["tuned"] if tuned else [])
    data = ModelCardData(
        base_model=source.hub_id if source else None,
        base_model_relation="finetune" if source and source.hub_id else None,
        library_name="transformers",
        license=source.license if source else None,
        tags=tags,
        pipeline_tag="text-generation",
    )
    name = repo or folder.name
    remote = layout is not None
    base = f"[{source.hub_id}](https://huggingface.co/{source.hub_id})" if source and source.hub_id else \
        f"`{source.id if source else 'unknown'}`"
    parts = [f"# {name}", ""]
    summary = layout.config_class.layout_summary if layout else f"the `{layout_name}` layout"
    parts += [f"{base} rewritten by rehead into {summary}"
              + (", then continue-tuned." if tuned else ".") if record else f"A `{layout_name}` checkpoint.", ""]
    savings = _savings(folder, config, record)
    if savings:
        parts += ["## What the layout saves", "", *savings, ""]
    if record and record.options:
        parts += ["## Conversion", "", "```yaml", yaml.safe_dump(_card_options(record.options), sort_keys=False).strip(),
                  "```", ""]
        if record.calibration:
            c = record.calibration
            parts += [f"Calibrated on {c.tokens:,} tokens of `{c.text}` (sha256 {c.sha256[:12]}…).", ""]
    if tuned:
        t = record.tune
        parts += ["## Continue-tuning", "", f"{t.steps} steps, {t.tokens:,} tokens. Recipe:", "", "```yaml",
                  yaml.safe_dump(t.recipe, sort_keys=False).strip(), "```", ""]
        if t.eval:
            curve = ", ".join(f"step {e.step}: {e.eval_ppl:.2f}" for e in t.eval)
            parts += [f"Held-out perplexity during tuning: {curve}.", ""]
    report = folder / "eval" / "report.md"
    if report.is_file():
        parts += ["## Evaluation (rehead eval, lm-evaluation-harness)", "", report.read_text().strip(), ""]
    snippet = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"' + (", trust_remote_code=True)" if remote else ")"),
        # AutoTokenizer reads the config too: without trust_remote_code it asks about the layout's code
        f'tokenizer = AutoTokenizer.from_pretrained("{name}"' + (", trust_remote_code=True)" if remote else ")"),
        'ids = tokenizer("The attention heads", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))",
    ]
    parts += ["## Usage", "", "```python", *snippet, "```", ""]
    if remote:
        parts += ["The layout's modeling code (`configuration_*.py`, `modeling_*.py`) travels with the weights and "
                  "imports only torch and transformers; with `pip install rehead` no remote code is needed.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))
