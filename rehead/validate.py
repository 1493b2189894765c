"""What a source checkpoint must be before a conversion starts: its config's fields of the right types,
not quantized, and every tensor present with the shape and dtype its config implies.

The tensors are checked from the shard headers (no tensor data is read), so a wrong checkpoint is
refused in a second whatever its size; a conversion that went on would write a model that does
not load, or (a quantized source) one that loads and computes nonsense.
"""

import torch
from transformers import LlamaConfig

from rehead import families
from rehead.checkpoint import FLOATS, CheckpointReader, read_config
from rehead.errors import ReheadError

# config fields and the types a LLaMA-family config gives them (None: the field may be null)
INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
OPTIONAL_INTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
NUMBERS = ("rms_norm_eps", "rope_theta")
BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
# what quantizers store instead of (or beside) float weights
QUANTIZED_DTYPES = ("U8", "I8", "I16", "I32", "U32", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2")
IGNORED = ("rotary_emb.inv_freq",)  # a buffer some old checkpoints stored; transformers recomputes it


def check_config(config: dict, where: str) -> None:
    """Refuses a config whose fields have the wrong types (those it has: a layout's config may lack some)."""
    if not isinstance(config.get("model_type"), str):
        raise ReheadError(f"{where}: config.json has no model_type string (got {config.get('model_type')!r}); "
                          "it is not a transformers model config")
    for key in INTS + OPTIONAL_INTS:
        value = config.get(key)
        if key in config and (value is not None or key in INTS) and (type(value) is not int or value <= 0):
            raise ReheadError(f"{where}: config.json {key} = {value!r}: must be a positive integer")
    for key in NUMBERS:
        value = config.get(key)
        if value is not None and (type(value) not in (int, float) or value <= 0):
            raise ReheadError(f"{where}: config.json {key} = {value!r}: must be a positive number")
    for key in BOOLS:
        if key in config and type(config[key]) is not bool:
            raise ReheadError(f"{where}: config.json {key} = {config[key]!r}: must be true or false")


def check_source_config(config: dict, where: str) -> None:
    """A conversion's source config: of the right types, and not a quantized checkpoint's."""
    quantization = config.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else quantization
        raise ReheadError(
            f"{where}: a quantized checkpoint (quantization_config: quant_method {method!r}); rehead rewrites "
            "full-precision weights. Dequantize first (load it with transformers and save_pretrained the "
            "dequantized model), or convert the unquantized original"
        )
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and "bits" in mlx:
        raise ReheadError(
            f"{where}: a quantized MLX checkpoint (quantization: {mlx.get('bits')} bits, group size "
            f"{mlx.get('group_size')}); rehead rewrites full-precision weights. Dequantize it first "
            "(mlx_lm.convert --dequantize), or convert the unquantized original"
        )
    check_config(config, where)


def expected_shapes(llama: LlamaConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The LLaMA form's tensors and their shapes, and the names among them a checkpoint may omit
    (a tied lm_head; o_proj's bias, which Qwen2 stores none of)."""
    hidden, inter, vocab = llama.hidden_size, llama.intermediate_size, llama.vocab_size
    head_dim = getattr(llama, "head_dim", None) or hidden // llama.num_attention_heads
    q, kv = llama.num_attention_heads * head_dim, (llama.num_key_value_heads or llama.num_attention_heads) * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    optional = {"lm_head.weight"} if llama.tie_word_embeddings else set()
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
             "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
             "mlp.down_proj.weight": (hidden, inter)}
    if llama.attention_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
                      "self_attn.o_proj.bias": (hidden,)})
    if getattr(llama, "qk_norm", False):  # Qwen3's per-head norms
        layer.update({"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)})
    if getattr(llama, "mlp_bias", False):
        layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (hidden,)})
    for index in range(llama.num_hidden_layers):
        prefix = f"model.layers.{index}."
        shapes.update({prefix + name: shape for name, shape in layer.items()})
        if llama.attention_bias:
            optional.add(prefix + "self_attn.o_proj.bias")
    return shapes, optional


def check_tensors(reader: CheckpointReader, config: dict, where: str) -> None:
    """Refuses quantized or non-float tensors, and (for a stock LLaMA-family source) a tensor missing,
    unexpected or of another shape than its config says."""
    headers = {name: entry for name, entry in reader.headers().items() if not name.endswith(IGNORED)}
    packed = sorted(name for name, (dtype, _) in headers.items() if dtype in QUANTIZED_DTYPES)
    if packed:
        dtype = headers[packed[0]][0]
        raise ReheadError(
            f"{where}: {len(packed)} tensors hold {dtype} values (e.g. {packed[0]}), as quantizers (bitsandbytes, "
            "GPTQ, AWQ, FP8) store packed weights; rehead rewrites full-precision weights. Dequantize first, or "
            "convert the unquantized original"
        )
    other = sorted(name for name, (dtype, _) in headers.items() if dtype not in FLOATS)
    if other:
        raise ReheadError(f"{where}: tensor {other[0]} is {headers[other[0]][0]}, not a float type; "
                          "a LLaMA-family checkpoint stores float weights (F32, F16, BF16)")
    check_shapes(headers, config, where)


def check_shapes(headers: dict[str, tuple[str, tuple[int, ...]]], config: dict, where: str) -> None:
    """For a stock LLaMA-family checkpoint: refuses a tensor missing, unexpected or of another shape than its
    config implies (a rehead layout's own config class checks its tensors)."""
    family = families.FAMILIES.get(config.get("model_type"))
    if family is None or family.stored(config) or config.get("quantization_config") is not None:
        return  # a rehead layout's config checks its own tensors; a family that fuses checks its own rows
    headers = {name: entry for name, entry in headers.items() if not name.endswith(IGNORED)}
    shapes, optional = expected_shapes(families.llama_config(config))
    missing = sorted(set(shapes) - set(headers) - optional)
    if missing:
        raise ReheadError(f"{where}: the weights lack {_some(missing)}, which config.json implies; the download is "
                          "incomplete or the config belongs to another model")
    unexpected = sorted(set(headers) - set(shapes))
    if unexpected:
        raise ReheadError(f"{where}: the weights hold {_some(unexpected)}, which a {config['model_type']} model of "
                          "this config does not have; rehead would not know what they compute")
    for name, expected in shapes.items():
        if name in headers and headers[name][1] != expected:
            raise ReheadError(f"{where}: tensor {name} has shape {list(headers[name][1])}, config.json implies "
                              f"{list(expected)}; the weights and the config belong to different models")


def check_checkpoint(folder, where: str) -> None:
    """A checkpoint about to be loaded (eval's baseline, before the candidate is scored): its config's types
    and, from the safetensors headers, its tensors' shapes."""
    config = read_config(folder)
    check_config(config, where)
    if any(folder.glob("*.safetensors")):
        check_shapes(CheckpointReader(folder).headers(), config, where)


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_device(device: str, flag: str = "--device") -> None:
    """Refuses a device torch does not know or this machine does not have, before any work."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ReheadError(f"{flag} {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ReheadError(f"{flag} {device}: CUDA is not available here; use {flag} cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ReheadError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA devices "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ReheadError(f"{flag} {device}: MPS is not available here; use {flag} cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ReheadError(f"{flag} {device}: rehead runs on cpu, cuda or mps")
