"""The options every conversion shares; each layout extends them with its own model in its converter module.

One pydantic model per layout serves the Python API (``convert(src, out, to="dha", kv_budget=0.5)``),
rehead.json and the command line, whose flags are built from the models' fields.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rehead import text
from rehead.errors import ReheadError, invalid
from rehead.models import DTYPES

CALIBRATION = {"group": "calibration"}


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)  # a field may have an alias (GDA's "lambda")

    to: str = Field(description="target layout")
    calib: str = Field(
        "shakespeare,pydoc", json_schema_extra=CALIBRATION,  # measured best across the held-out kinds (BENCHMARKS.md)
        description="calibration text: a built-in name (shakespeare, pydoc; self: text sampled from the source "
                    "model on --device, cached), files or folders, or a datasets id ID[:CONFIG][@SPLIT][#COLUMN]; "
                    "several joined with commas share the token budget, equally or by an optional =WEIGHT each "
                    "(shakespeare=2,pydoc)")
    calib_seed: int = Field(0, json_schema_extra=CALIBRATION, description="seed of the text --calib self samples")
    calib_tokens: int = Field(8192, gt=0, json_schema_extra=CALIBRATION, description="calibration tokens")
    calib_seq_len: int = Field(512, gt=1, json_schema_extra=CALIBRATION, description="calibration sequence length")
    check_identity: bool = Field(
        False, json_schema_extra=CALIBRATION,
        description="verify on calibration text that every converted layer computes the source's function "
                    "(for identity settings: MoH with every head active, DHA at budget 1, GDA grow)")
    revision: str | None = Field(None, description="hub revision of SRC (branch, tag or commit)")
    tokenizer: str | None = Field(None, description="take the tokenizer from this checkpoint or hub id")
    allow_pickle: bool = Field(False, description="read pickled .bin weights (with torch.load(weights_only=True))")
    dtype: Literal[("auto", *DTYPES)] = Field("auto", description="output dtype (auto: the source's)")
    device: str = Field("cpu", description="where calibration runs: cpu, cuda, cuda:1")
    overwrite: bool = Field(False, description="replace OUT if it exists")
    max_shard_gb: float = Field(2.0, gt=0, description="largest output shard in GiB")

    @field_validator("calib")
    @classmethod
    def _mixture(cls, value: str) -> str:
        text.mixture(value)
        return value

    @classmethod
    def own_fields(cls) -> dict:
        """The fields a layout's options add to the shared ones: its command-line flags."""
        return {name: f for name, f in cls.model_fields.items() if name not in ConvertOptions.model_fields}


def flag(name: str) -> str:
    return "--" + name.rstrip("_").replace("_", "-")


def options_error(error: ValidationError) -> ReheadError:
    """A ValidationError as the user's flags: ``--kv-budget 1.5: must be in (0, 1]``."""
    return ReheadError(invalid(error, name=lambda loc: flag(str(loc[0])), unknown="not an option of this layout",
                               as_typed=True))


def head_count(value: float, heads: int, flag: str) -> int:
    """A head count given as a count (>= 1) or a fraction in (0, 1) of ``heads``; fractions round to
    the nearest count, halves down (0.5 of 9 heads is 4)."""
    check_head_value(value, flag)
    if 0 < value < 1:
        return int(-(-(2 * value * heads - 1) // 2))  # ceil(value·heads − ½)
    return int(value)


def check_head_value(value: float, flag: str) -> float:
    if value < 0 or (value > 1 and value != int(value)):
        raise ReheadError(f"{flag} {value:g}: give a count (0, 1, 2, ...) or a fraction in (0, 1)")
    return value
