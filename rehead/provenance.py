"""``rehead.json``: where a checkpoint came from and what each stage did to it.

One typed record, written by the one checkpoint writer (rehead.writer) and read through
``Provenance.load``. A stage appends its own part (convert: source, options, calibration, plan;
tune: the recipe and its held-out curve) and keeps what the checkpoint it started from recorded.
"""

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

import rehead
from rehead.errors import ReheadError
from rehead.files import write_text

FILE = "rehead.json"


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # a newer rehead's keys survive a round trip through an older one


class SourceRecord(Record):
    id: str  # the hub id, built-in name or absolute folder the conversion read
    revision: str | None = None
    files: dict[str, str] = {}  # file name -> sha256
    license: str | None = None
    hub_id: str | None = None
    query_heads: int | None = None
    kv_cache_bytes_per_token_bf16: int | None = None


class CalibrationRecord(Record):
    text: str
    tokens: int
    seq_len: int
    sha256: str


class EvalPoint(Record):
    step: int
    eval_ppl: float


class TuneRecord(Record):
    recipe: dict
    steps: int
    tokens: int
    eval: list[EvalPoint] = []


class Provenance(Record):
    rehead_version: str = rehead.__version__
    layout: str | None = None
    source: SourceRecord | None = None
    options: dict = {}
    calibration: CalibrationRecord | None = None
    plan: dict = {}
    identity_error_per_layer: list[float] | None = None
    tune: TuneRecord | None = None

    @classmethod
    def load(cls, folder: Path) -> "Provenance | None":
        """The folder's record, or None for a checkpoint rehead did not write."""
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError) as e:
            raise ReheadError(f"{path}: not a valid rehead record ({str(e).splitlines()[0]})") from None

    def save(self, folder: Path) -> None:
        write_text(Path(folder) / FILE, self.model_dump_json(indent=2, exclude_none=False) + "\n")

    @property
    def source_id(self) -> str | None:
        return self.source.id if self.source else None
