"""Other tools' checkpoint formats, recognised so that a refusal says what the input is and how to get a
Hugging Face safetensors checkpoint from it (rehead reads only those)."""

import json
from pathlib import Path

HF_CHECKPOINT = "a Hugging Face checkpoint folder (config.json and model*.safetensors)"


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def describe_file(path: Path) -> str | None:
    """What a file given where a checkpoint folder belongs is, and what to do; None when unknown."""
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return (f"a GGUF file (llama.cpp's format); rehead reads {HF_CHECKPOINT}. Give the Hub id of the original "
                "model, or dequantize it with transformers (AutoModelForCausalLM.from_pretrained(FOLDER, "
                f"gguf_file={path.name!r}), then save_pretrained)")
    if suffix == ".safetensors":
        return f"a safetensors file; give the folder that holds it and its config.json ({HF_CHECKPOINT})"
    if suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return (f"a PyTorch pickle file; give {HF_CHECKPOINT} (pytorch_model.bin weights are read with "
                "--allow-pickle)")
    if suffix in (".yaml", ".yml"):
        return ("a YAML file: a mergekit config is run with mergekit first and its output folder converted; a "
                "rehead recipe is run with rehead tune")
    if suffix == ".onnx":
        return f"an ONNX model (an inference export); give the {HF_CHECKPOINT} it was exported from"
    if path.name == "config.json":
        return f"a config file; give the folder that holds it ({HF_CHECKPOINT})"
    return None


def describe_folder(folder: Path) -> str | None:
    """What a folder with no config.json or no weights rehead reads holds, and what to do; None when unknown."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if "adapter_config.json" in names:
        base = _json(folder / "adapter_config.json").get("base_model_name_or_path")
        return ("a PEFT adapter" + (f" of {base}" if base else "") + ", not a whole model: merge it into its base "
                "first (PeftModel.from_pretrained(base, FOLDER).merge_and_unload(), then save_pretrained), or "
                "convert the base model")
    if "params.json" in names and any(n.startswith("consolidated.") for n in names):
        return ("Meta's original checkpoint format (params.json, consolidated.*.pth); convert it with transformers' "
                "convert_llama_weights_to_hf script first")
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if ggufs and not any(n.endswith(".safetensors") for n in names):
        return describe_file(folder / ggufs[0])
    if "tf_model.h5" in names or "flax_model.msgpack" in names:
        framework = "TensorFlow" if "tf_model.h5" in names else "Flax"
        flag = "from_tf" if framework == "TensorFlow" else "from_flax"
        return (f"{framework} weights; load them with transformers ({flag}=True, in a version that still reads "
                "them) and save_pretrained as safetensors")
    if "model.onnx" in names:
        return describe_file(folder / "model.onnx")
    pickles = sorted(n for n in names if n.endswith((".pt", ".pth", ".ckpt")))
    if pickles:
        return (f"weights in {pickles[0]}, a PyTorch pickle transformers does not name; load them into the model "
                "and save_pretrained as safetensors")
    if "optimizer.bin" in names or "optimizer.pt" in names or "random_states_0.pkl" in names:
        return ("a training checkpoint (optimizer state); give the model it belongs to, e.g. a rehead run's "
                "OUTPUT_DIR/model")
    return None
