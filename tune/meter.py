"""Throughput, MFU, peak memory, and the CSV tracker for accelerate."""

import csv
import resource
import sys
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker, on_main_process

# dense bf16 peak TFLOP/s by device name (no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0, "RTX 4090": 165.0, "V100": 125.0}


def detect_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (embeddings excluded, the LM head counted)
    plus attention's score and value products, 12·layers·(query width)·seq_len (forward and backward)."""
    config = model.config
    weights = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if getattr(config, "tie_word_embeddings", False):
        weights += config.vocab_size * config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    return 6.0 * weights + 12.0 * config.num_hidden_layers * width * seq_len


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class CSVTracker(GeneralTracker):
    """One row per logged step in OUT/log.csv; new metric names widen the header."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "log.csv"
        self.rows: list[dict] = []
        self.fields: list[str] = []  # the header: every column seen, in order of appearance
        if self.path.is_file():
            with self.path.open() as f:
                reader = csv.DictReader(f)
                self.rows = list(reader)
                self.fields = list(reader.fieldnames or [])

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        pass  # the resolved recipe is saved as recipe.yaml beside the log

    def truncate(self, step: int) -> None:
        """Drops the rows after ``step``: a resumed run logs them again."""
        self.rows = [r for r in self.rows if int(r["step"]) <= step]
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        row = {"step": step, **values}
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new or not self.path.is_file():
            self.fields.extend(new)
            self._rewrite()  # a new column: the header changes
            return
        with self.path.open("a", newline="") as f:  # the usual case: one appended line, no rereading
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)
