"""Tiny random checkpoints of every source shape, a byte-level tokenizer for them, and the real model."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config

# name -> (config class, config values); every shape the design asks the unit tests to cover
VARIANTS = {
    "mha": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "gqa": (LlamaConfig, dict(num_attention_heads=6, num_key_value_heads=2)),
    "odd": (LlamaConfig, dict(num_attention_heads=9, num_key_value_heads=3, head_dim=8)),
    "mqa-tied": (LlamaConfig, dict(num_attention_heads=5, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)),
    "bias": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    "qwen2": (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
}
VOCAB = 260


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 256 byte tokens and an EOS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_checkpoint(folder: Path, variant: str = "gqa", layers: int = 2, seed: int = 0, tokenizer: bool = True,
                    **overrides) -> Path:
    """A random checkpoint of ``variant``; ``overrides`` replace config values (intermediate_size=256)."""
    config_class, values = VARIANTS[variant]
    values = {
        "vocab_size": VOCAB,
        # with an explicit head_dim the hidden size differs from heads·head_dim
        "hidden_size": values["num_attention_heads"] * (4 if "head_dim" in values else 8),
        "intermediate_size": 48,
        "num_hidden_layers": layers,
        "max_position_embeddings": 512,
        "eos_token_id": 256,
        "bos_token_id": None,
        "pad_token_id": 256,
        **values,
        **overrides,
    }
    values.setdefault("tie_word_embeddings", False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_class(**values), dtype=torch.float32)
    randomise(model)
    model.save_pretrained(folder)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return folder


def randomise(model, also=lambda name: False):
    """Random biases (and the parameters ``also`` names), so that a dropped or zeroed one shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or also(name):
                param.normal_(0, 0.5)
    return model


def assert_matches_reference(model, reference, ids: torch.Tensor) -> None:
    """The batched fast path's logits equal ``reference(model, sequence)`` on each sequence alone."""
    with torch.no_grad():
        fast = model(ids).logits
    for b in range(len(ids)):
        torch.testing.assert_close(fast[b].double(), reference(model, ids[b]), atol=1e-4, rtol=1e-4)


@pytest.fixture
def tiny(tmp_path):
    """A factory: tiny(variant="gqa", **kw) -> the folder of a fresh tiny checkpoint."""
    counter = iter(range(1000))

    def build(variant: str = "gqa", **kwargs) -> Path:
        return make_checkpoint(tmp_path / f"src-{variant}-{next(counter)}", variant, **kwargs)

    return build


@pytest.fixture
def calib_file(tmp_path) -> Path:
    """Real English text (Python's reference text) as a .txt file, enough for byte-level calibration."""
    from pydoc_data.topics import topics

    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:200_000])
    return path


def logits(folder: Path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def smollm2():
    from rehead import builtin

    return builtin.model_path("smollm2-135m")


def save_pickled(folder: Path) -> None:
    """Turns a safetensors checkpoint into a pytorch_model.bin one."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


BLOCK_REHEAD = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoRehead(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rehead" or name.startswith("rehead."):
                raise ImportError("rehead is not installed here")

    sys.meta_path.insert(0, NoRehead())
    """
)

LOAD_AND_GENERATE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    try:
        import rehead
        raise SystemExit("rehead was importable")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    print(json.dumps({"class": type(model).__name__, "logits": logits[0, -1].tolist(),
                      "new_tokens": generated.shape[1] - ids.shape[1], "static_equal": torch.equal(static, generated)}))
    """
)


def interruptible() -> None:
    """``Popen(preexec_fn=interruptible)``: the child takes SIGINT as Ctrl-C even when this test run ignores it
    (a run started in the background by a shell without job control inherits SIGINT ignored, and Python
    then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def load_without_rehead(folder: Path, ids: list[list[int]], tmp_path: Path) -> dict:
    """Loads ``folder`` with trust_remote_code in a subprocess where ``import rehead`` fails, as a user
    without rehead would, and generates with the dynamic and the static cache; returns {"class", "logits" (last
    position), "new_tokens", "static_equal" (the static cache generated the same tokens)}."""
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_REHEAD + LOAD_AND_GENERATE, str(folder), json.dumps(ids)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


__all__ = ["VARIANTS", "byte_tokenizer", "load_without_rehead", "logits", "make_checkpoint", "read_json", "save_file", "save_pickled"]


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub stand-in (tests/hub_server.py) on 127.0.0.1, with HF_ENDPOINT and HF_TOKEN pointing at it."""
    from hub_server import FakeHub

    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", server.token)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield server
