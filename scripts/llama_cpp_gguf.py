"""A checkpoint to GGUF with llama.cpp's own converter, for llama.cpp and llama-cpp-python.

    python scripts/llama_cpp_gguf.py CHECKPOINT OUT.gguf [--outtype f32|f16|bf16|q8_0] [--llama-cpp DIR]

It runs ``convert_hf_to_gguf.py`` of a llama.cpp source tree: ``--llama-cpp DIR``, else
$REHEAD_LLAMA_CPP, else ``vendor/llama.cpp`` of the sdist of the installed llama-cpp-python
(fetched from PyPI once into ~/.cache/rehead, so that the converter writes what that build of
llama.cpp reads).

One choice differs from the converter's own: its DeciLM class (``conversion/deci.py``,
``DeciModel.set_vocab``) takes the GPT-2 BPE vocabulary path only for a 128256-token vocabulary
(Llama 3) and the sentencepiece-Llama path for every other size, so a DeciLM checkpoint with any
other BPE tokenizer (SmolLM2's 49152 tokens) stops with "Cannot find Llama BPE tokenizer".
For a DeciLM checkpoint whose tokenizer.json is BPE and that has no sentencepiece model, this
script subclasses the class to take the GPT-2 path, as the converter does for LLaMA itself.

A second: a DeepSeek-V2/V3 checkpoint with ``q_lora_rank: null`` (a plain q_proj, as rehead's MLA
export writes). The converter (``conversion/deepseek.py``) then writes no
``deepseek2.attention.q_lora_rank`` key, and llama.cpp (``src/models/deepseek2.cpp``) requires it
unless the model has 26 or 27 layers (or 48 with a 128,256-token vocabulary): any other depth stops
with "key not found in model: deepseek2.attention.q_lora_rank". This script writes the key as 0,
the value with which llama.cpp reads the plain ``attn_q.weight`` (exact: the same tensor, no extra
parameters). And where no layer is MoE (``first_k_dense_replace`` at the depth, as that export writes,
with ``n_routed_experts: 1, n_group: 1``), the converter's expert group count 1 stops llama.cpp's loader
(``src/llama-model.cpp``: "GGML_ASSERT(hparams.n_expert_groups < hparams.n_expert) failed"); this script
leaves the two group keys out, as for a checkpoint without groups (they route experts no layer has).
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("REHEAD_CACHE", Path.home() / ".cache" / "rehead"))
TREE_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")

RUN_CONVERTER = """
import json, sys
from pathlib import Path

tree, model, out, outtype = sys.argv[1:5]
sys.path[:0] = [str(Path(tree) / "gguf-py"), tree]
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
import convert_hf_to_gguf
from conversion import ModelBase, get_model_class

config = json.loads((Path(model) / "config.json").read_text())
tokenizer = Path(model) / "tokenizer.json"
bpe = tokenizer.is_file() and json.loads(tokenizer.read_text())["model"]["type"] == "BPE"
if config.get("architectures") == ["DeciLMForCausalLM"] and bpe and not (Path(model) / "tokenizer.model").is_file():
    deci = get_model_class("DeciLMForCausalLM")

    class BPEDeciModel(deci):
        model_arch = deci.model_arch

        def set_vocab(self):
            self._set_vocab_gpt2()

    ModelBase.register("DeciLMForCausalLM")(BPEDeciModel)
if config.get("architectures") in (["DeepseekV3ForCausalLM"], ["DeepseekV2ForCausalLM"]) and \
        config.get("q_lora_rank") is None:
    deepseek = get_model_class(config["architectures"][0])

    class PlainQueryDeepseekModel(deepseek):
        model_arch = deepseek.model_arch

        def set_gguf_parameters(self):
            super().set_gguf_parameters()
            self.gguf_writer.add_q_lora_rank(0)  # llama.cpp: 0 reads the plain attn_q.weight
            if config.get("first_k_dense_replace", 0) >= config["num_hidden_layers"]:
                arch = self.gguf_writer.arch
                self.gguf_writer.remove_key(f"{arch}.expert_group_count")
                self.gguf_writer.remove_key(f"{arch}.expert_group_used_count")

    ModelBase.register(config["architectures"][0])(PlainQueryDeepseekModel)
convert_hf_to_gguf.main()
"""


def llama_cpp_tree(explicit: str | None = None) -> Path:
    """A llama.cpp source tree with convert_hf_to_gguf.py (see the module's docstring for the order)."""
    given = explicit or os.environ.get("REHEAD_LLAMA_CPP")
    if given:
        tree = Path(given).expanduser()
        if not (tree / "convert_hf_to_gguf.py").is_file():
            raise SystemExit(f"{tree}: no convert_hf_to_gguf.py; give a llama.cpp source tree")
        return tree
    try:
        from importlib.metadata import version

        installed = version("llama-cpp-python")
    except Exception:
        raise SystemExit("llama-cpp-python is not installed: give --llama-cpp DIR (a llama.cpp source tree)") from None
    tree = CACHE / f"llama-cpp-python-{installed}" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        downloads = CACHE / "downloads"
        sdist = downloads / f"llama_cpp_python-{installed}.tar.gz"
        if not sdist.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={installed}", "-d", str(downloads)], check=True)
        prefix = f"llama_cpp_python-{installed}/vendor/llama.cpp/"
        partial = tree.with_name("llama.cpp.partial")
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                inner = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and inner.startswith(TREE_FILES) and member.isfile():
                    member.name = inner
                    archive.extract(member, partial, filter="data")
        partial.rename(tree)
    return tree


def to_gguf(checkpoint: Path, out: Path, outtype: str = "f32", tree: Path | None = None) -> Path:
    """Converts ``checkpoint`` into the GGUF file ``out``; returns ``out``."""
    tree = tree or llama_cpp_tree()
    result = subprocess.run([sys.executable, "-c", RUN_CONVERTER, str(tree), str(checkpoint), str(out), outtype],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {checkpoint}:\n{result.stderr[-3000:]}")
    return Path(out)


def perplexity(llm, blocks) -> float:
    """The perplexity a loaded llama_cpp.Llama (logits_all=True) gives exactly these token ids, (n, L), each
    block scored on its own."""
    import math

    import numpy as np
    import torch

    total, count = 0.0, 0
    for block in blocks.tolist():
        llm.reset()
        llm.eval(block)
        scores = torch.from_numpy(np.array(llm.scores[: len(block) - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(scores, torch.tensor(block[1:]), reduction="sum").item()
        count += len(block) - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--llama-cpp", help="llama.cpp source tree (default: $REHEAD_LLAMA_CPP, or the sdist's)")
    args = parser.parse_args()
    config = json.loads((Path(args.checkpoint) / "config.json").read_text())
    out = to_gguf(Path(args.checkpoint), Path(args.out), args.outtype, llama_cpp_tree(args.llama_cpp))
    print(f"{config.get('architectures')[0]} → {out}")


if __name__ == "__main__":
    main()
