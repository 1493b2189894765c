"""The options of ``rehead convert``: one pydantic model serves the Python API and the command line."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rehead.errors import ReheadError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: Literal["mha", "moh", "dha", "gda"]
    # MoH
    active_heads: float = Field(0.75, description="heads each token uses: a count, or a fraction of the heads")
    shared_heads: float = Field(0.5, description="always-on heads: a count, or a fraction of the heads")
    router: Literal["query-norm", "learned"] = "query-norm"
    shared: Literal["calibrated", "first"] = "calibrated"
    # DHA
    kv_budget: float | None = Field(None, description="fraction of the source's K and V heads kept, over all layers")
    k_budget: float | None = Field(None, description="fraction of the source's key heads kept")
    v_budget: float | None = Field(None, description="fraction of the source's value heads kept")
    fusion: Literal["optimal", "mean"] = "optimal"
    uniform: bool = False
    refine_steps: int = Field(0, ge=0)
    refine_lr: float = Field(1e-4, gt=0)
    export: Literal["deci"] | None = Field(None, description="deci: DeciLM (nemotron-nas) for vLLM, llama.cpp")
    # GDA
    ratio: int | None = Field(None, description="signal heads per noise-control head")
    mode: Literal["grow", "repurpose"] = "grow"
    subln: bool = False
    # calibration
    calib: str = "shakespeare"
    calib_tokens: int = Field(8192, gt=0)
    calib_seq_len: int = Field(512, gt=1)
    check_identity: bool = Field(False, description="verify on calibration text that each converted layer is the source's")
    # input and output
    revision: str | None = None
    tokenizer: str | None = None
    allow_pickle: bool = False
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "cpu"
    overwrite: bool = False
    max_shard_gb: float = Field(2.0, gt=0)


def head_count(value: float, heads: int, flag: str) -> int:
    """A head count given as a count (>= 1) or a fraction in (0, 1) of ``heads``; fractions round to
    the nearest count, halves down (0.5 of 9 heads is 4)."""
    if value < 0 or (value > 1 and value != int(value)):
        raise ReheadError(f"{flag} {value:g}: give a count (0, 1, 2, ...) or a fraction in (0, 1)")
    if 0 < value < 1:
        return int(-(-(2 * value * heads - 1) // 2))  # ceil(value·heads − ½)
    return int(value)
