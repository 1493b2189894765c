"""The tuning recipe: a YAML file validated by pydantic, with dotted ``key=value`` overrides.

    rehead tune recipes/smollm2-135m-moh.yaml optim.lr=1e-5 train.max_steps=20

Every key is documented by its field description; unknown keys and wrong types are refused
with the key's dotted name, the value given and the type expected.
"""

import difflib
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rehead import text
from rehead.errors import ReheadError, invalid


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Data(Section):
    train: text.Mixture = Field(
        "shakespeare", description="training text: a text (built-in name, local files/folder, datasets id; "
                                   "self: text sampled from the teacher), or a mixture of them: texts joined with "
                                   "commas, each with an optional =WEIGHT, a list of them, or a mapping "
                                   "{text: weight} (no weights: equal ones)")
    eval: text.Mixture | None = Field("shakespeare-heldout",
                                      description="held-out text for eval perplexity, a text or a mixture (null: none)")
    seq_len: int = Field(512, gt=1, description="tokens per packed block")
    eval_tokens: int = Field(16384, gt=0, description="tokens of held-out text scored at each evaluation")
    streaming: bool = Field(
        False, description="pack blocks on the fly from a document stream (for sets too large to tokenize up front)"
    )
    shuffle_buffer: int = Field(1024, gt=0, description="blocks in the shuffle buffer when streaming")

    @field_validator("train", "eval")
    @classmethod
    def _mixture(cls, value):
        if value is not None:
            text.mixture(value)
        return value


class Loss(Section):
    lm: float = Field(1.0, ge=0, description="weight of the language-modelling loss")
    kd: float = Field(0.0, ge=0, description="weight of distillation from the teacher (needs teacher)")
    kd_temperature: float = Field(1.0, gt=0, description="softmax temperature of the distillation")
    layout: float = Field(1.0, ge=0, description="weight of the layout's own loss terms (MoH load balance)")
    chunk_tokens: int = Field(1024, gt=0, description="tokens per chunk of the vocabulary-sized loss computation")


class Optim(Section):
    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of cosine, linear and wsd schedules")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: fraction of the steps spent decaying")
    clip: float | None = Field(1.0, gt=0, description="gradient-norm clipping (null: none)")
    fused: bool | None = Field(None, description="AdamW's fused kernel (null: fused on CUDA, torch's default elsewhere)")


class Train(Section):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (or give max_tokens)")
    max_tokens: int | None = Field(None, gt=0, description="training tokens; steps = tokens / tokens per step")
    micro_batch: int = Field(1, gt=0, description="blocks per process per forward")
    grad_accum: int = Field(1, gt=0, description="forwards per optimizer step")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(2, gt=0, description="checkpoints kept")
    eval_every: int = Field(0, ge=0, description="eval perplexity every N steps (0: at the start and end only)")
    log_every: int = Field(1, gt=0)
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each decoder layer (regional compilation: one layer's "
                                             "graph, reused by every layer)")
    peak_tflops: float | None = Field(
        None, gt=0, description="the accelerator's peak TFLOP/s for MFU (detected for known GPUs)"
    )

    @model_validator(mode="after")
    def _length(self):
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError("give exactly one of train.max_steps and train.max_tokens")
        return self


class Lora(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Recipe(Section):
    model: str = Field(description="the checkpoint to tune: a converted folder, built-in name or hub id")
    teacher: str | None = Field(None, description="the original checkpoint, for distillation")
    revision: str | None = Field(None, description="hub revision of model")
    data: Data = Data()
    loss: Loss = Loss()
    optim: Optim = Optim()
    train: Train
    trainable: Literal["all", "attention", "new"] = "all"
    lora: Lora | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    output_dir: str = Field(description="run folder: checkpoints, logs, the resolved recipe and the final model")
    resume: str = Field("auto", description="auto (newest checkpoint in output_dir), never, or a checkpoint folder")
    log: Literal["tensorboard", "wandb", "csv", "none"] = "csv"
    seed: int = 0
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @model_validator(mode="after")
    def _losses(self):
        if self.loss.kd > 0 and self.teacher is None:
            raise ValueError("loss.kd > 0 needs a teacher (the original checkpoint)")
        if self.loss.lm == 0 and self.loss.kd == 0:
            raise ValueError("loss.lm and loss.kd are both 0: nothing to train on")
        if self.teacher is None and "self" in text.parts(self.data.train):
            raise ValueError("data.train: 'self' is text sampled from the teacher; give a teacher (the original "
                             "checkpoint) or other texts")
        return self

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = tree.get(key)
        if node is None:
            node = tree[key] = {}
        if not isinstance(node, dict):
            raise ReheadError(f"override {dotted}={value!r}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def builtin_recipes() -> dict:
    """The recipes that ship with rehead (package data), by name: ``smollm2-135m-moh``, ..., the
    accelerate configs as ``accelerate/single-gpu``, ... and rehead pipeline's as ``pipeline/default``"""
    root = resources.files("rehead.recipes")
    found = {p.name.removesuffix(".yaml"): p for p in root.iterdir() if p.name.endswith(".yaml")}
    for folder in ("accelerate", "pipeline"):
        found.update({f"{folder}/{p.name.removesuffix('.yaml')}": p for p in root.joinpath(folder).iterdir()
                      if p.name.endswith(".yaml")})
    return dict(sorted(found.items()))


def locate(spec: str | Path):
    """A recipe file: an existing path, or the name of a built-in recipe (a ``Traversable`` of the package)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    known = builtin_recipes()
    if str(spec) in known:
        return known[str(spec)]
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        raise ReheadError(f"recipe {spec}: no such file")
    names = [n for n in known if "/" not in n]
    close = difflib.get_close_matches(str(spec), names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ReheadError(f"recipe {spec!r}: no such file or built-in recipe; {hint}built-in: {', '.join(names)} "
                      "(rehead recipes lists them)")


def load(path: str | Path | None, overrides: list[str] = (), values: dict | None = None,
         schema: type[BaseModel] = Recipe):
    """The recipe in ``path`` (a file or a built-in recipe's name; or just ``values``) with ``overrides``
    ("a.b=value", YAML-parsed) applied, validated by ``schema`` (rehead pipeline's recipe has its own)."""
    tree: dict = {}
    if path is not None:
        path = locate(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ReheadError(f"recipe {path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ReheadError(f"recipe {path}: the top level must be a mapping of keys, not {type(tree).__name__}")
    for key, value in (values or {}).items():
        _set(tree, key, value)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ReheadError(f"override {item!r}: write KEY=VALUE, e.g. optim.lr=1e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ReheadError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                              "write a YAML value, e.g. optim.betas=[0.9,0.95]") from None
        _set(tree, key.strip(), value)
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        where = f"recipe {path}" if path else "recipe"
        message = invalid(e, name=lambda loc: ".".join(map(str, loc)), unknown="unknown key")
        raise ReheadError(f"{where}: {message}") from None
