"""The layer-streamed conversion engine that every layout's conversion runs through.

    for each decoder layer l:
        read l's tensors → statistics on l's calibration inputs → rewrite →
        run the *converted* layer on the inputs to get layer l+1's inputs → write l's tensors

Peak memory is one decoder layer plus the calibration activations, whatever the model's size.
"""

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

import rehead
from rehead import architectures, text
from rehead.checkpoint import (
    FLOATS,
    STORED_DTYPES,
    CheckpointReader,
    ShardWriter,
    atomic_output,
    check_output,
    copy_side_files,
    read_config,
)
from rehead.errors import ReheadError
from rehead.heads import LAYER_RE, head_dim_of
from rehead.layouts import LAYOUTS
from rehead.sources import Source, card_metadata, resolve

from .options import DTYPES, ConvertOptions

log = logging.getLogger("rehead.convert")
IDENTITY_TOLERANCE = 1e-4


@dataclass
class Calibration:
    """One layer's calibration inputs (n_seq, seq_len, d_model) and the means to run a layer on them."""

    hidden: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    micro_batch: int = 4

    @torch.no_grad()
    def run(self, layer: nn.Module, hooks: dict | None = None) -> torch.Tensor:
        """Runs ``layer`` over every sequence; ``hooks`` maps submodules to forward hooks(module, args, output)."""
        handles = [module.register_forward_hook(hook) for module, hook in (hooks or {}).items()]
        try:
            outputs = []
            for start in range(0, len(self.hidden), self.micro_batch):
                batch = self.hidden[start : start + self.micro_batch]
                cos, sin = (t[: len(batch)] for t in self.position_embeddings)
                outputs.append(layer(batch, attention_mask=None, position_embeddings=(cos, sin)))
            return torch.cat(outputs)
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class LayerInput:
    """What a rewriter gets for layer ``index``: its tensors (names relative to the layer: all of them
    when calibrating, else those its ``needs_tensor`` asks for) and, when calibrating, the source layer
    ready to run and its calibration inputs."""

    index: int
    tensors: dict[str, torch.Tensor]
    source_layer: nn.Module | None = None
    calibration: Calibration | None = None


class Rewriter:
    """A layout's conversion. Subclasses set the class attributes and override the hooks they need."""

    layout = ""
    needs_calibration = False
    layout_files: list[Path] = []
    source_layouts: tuple[str, ...] = ()  # rehead layouts it also reads as a source (stock LLaMA forms always)

    def __init__(self, options: ConvertOptions):
        self.options = options
        self.source_config: dict = {}

    def setup(self, source_config: dict) -> None:
        """Checks the options against the source; raises ReheadError before anything is written."""
        self.source_config = source_config

    needs_planning = False

    def observe_layer(self, layer: LayerInput) -> None:
        """The planning pass (when ``needs_planning``): sees every source layer on the source's activations."""

    def plan_budget(self) -> None:
        """Called once after the planning pass, before the conversion pass."""

    def needs_tensor(self, name: str) -> bool:
        """Whether the rewriter needs this layer tensor (name relative to the layer) when no
        calibration runs; the others are copied unchanged without being read."""
        return name.startswith("self_attn.")

    def rewrite_layer(self, layer: LayerInput) -> dict[str, torch.Tensor]:
        """The layer's tensors in the target layout (names relative to the layer); a tensor it was
        given and returns as the same object is written as the source's bytes."""
        raise NotImplementedError

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """The converted decoder layer, for producing the next layer's calibration inputs."""
        raise NotImplementedError

    def source_module(self, index: int, tensors: dict[str, torch.Tensor], llama_config, device: str) -> nn.Module:
        """The source's decoder layer holding ``tensors``, run on the calibration inputs."""
        return build_layer(LlamaDecoderLayer, llama_config, index, tensors, device)

    def target_config(self) -> dict:
        raise NotImplementedError

    def plan(self) -> dict:
        """What the conversion decided, for rehead.json."""
        return {}

    def write_extras(self, folder: Path) -> None:
        """Writes any files of the layout's own into the output folder."""


def build_layer(layer_class: type, config, index: int, tensors: dict[str, torch.Tensor], device: str) -> nn.Module:
    """A decoder layer holding ``tensors`` in float32 on ``device``, built without initialising random
    weights first; a missing o_proj bias (Qwen2's LLaMA form) is zero."""
    with torch.device("meta"):
        module = layer_class(config, index)
    state = {name: t.to(device=device, dtype=torch.float32) for name, t in tensors.items()}
    if "self_attn.o_proj.bias" not in state and module.self_attn.o_proj.bias is not None:
        state["self_attn.o_proj.bias"] = torch.zeros(config.hidden_size, device=device)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


def head_statistics(layer: LayerInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per calibration token (rows): the attention input x, each query head's query norm, and each
    head's contribution energy ||W_o^i · head_i||² to the attention output."""
    attn = layer.source_layer.self_attn
    head_dim, inputs, norms, energies = attn.head_dim, [], [], []

    def on_query(module, args, output):
        inputs.append(args[0].flatten(0, 1))
        norms.append(output.flatten(0, 1).unflatten(-1, (-1, head_dim)).norm(dim=-1))

    def on_output(module, args, output):
        heads = args[0].flatten(0, 1).unflatten(-1, (-1, head_dim))  # (N, H, d)
        weight = module.weight.unflatten(1, (-1, head_dim))  # (D, H, d)
        energies.append(torch.stack([(heads[:, h] @ weight[:, h].T).pow(2).sum(-1) for h in range(heads.shape[1])], 1))

    layer.calibration.run(layer.source_layer, {attn.q_proj: on_query, attn.o_proj: on_output})
    return torch.cat(inputs), torch.cat(norms), torch.cat(energies)


def check_identity(index: int, source: nn.Module, converted: nn.Module, calibration: Calibration) -> float:
    """The converted layer's largest deviation from the source layer on a calibration micro-batch,
    relative to the output's scale; raises when it is more than float32 noise (``--check-identity``)."""
    first = Calibration(calibration.hidden[: calibration.micro_batch], calibration.position_embeddings)
    expected, got = first.run(source), first.run(converted)
    error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1.0)
    if error > IDENTITY_TOLERANCE:
        raise ReheadError(
            f"--check-identity: layer {index} differs from the source by {error:.3g} (relative; tolerance "
            f"{IDENTITY_TOLERANCE:g}): these options do not preserve the function; nothing was written"
        )
    return error


# PreTrainedConfig's task and output settings: noise in a causal LM's config.json
GENERIC_KEYS = ("_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "is_encoder_decoder",
                "output_attentions", "output_hidden_states", "problem_type", "return_dict")


def llama_values(llama_config) -> dict:
    """The source's LLaMA form as keyword arguments for a layout's config class."""
    values = llama_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "dtype"):
        values.pop(key, None)
    return values


def layout_config_json(config, layout: str) -> dict:
    """config.json of a checkpoint in ``layout``: the config less generic keys, with its architecture
    and the auto_map that lets transformers load it without rehead."""
    values = {k: v for k, v in config.to_dict().items() if k not in GENERIC_KEYS}
    return {**values, "architectures": [LAYOUTS[layout].model_class.__name__], "auto_map": LAYOUTS[layout].auto_map}


def output_dtype(options: ConvertOptions, config: dict) -> torch.dtype:
    name = DTYPES.get(options.dtype) or config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def load_tokenizer(options: ConvertOptions, source: Source):
    where = resolve(options.tokenizer).path if options.tokenizer else source.path
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, TypeError) as e:
        log.debug("no tokenizer in %s: %s", where, e)
        return None


def convert(source_spec: str, out: Path, options: ConvertOptions, rewriter: Rewriter) -> Path:
    out = Path(out).expanduser()
    source = resolve(source_spec, options.revision, options.allow_pickle)
    if out.resolve() == source.path.resolve():
        raise ReheadError(f"{out}: the output folder is the source; choose another one")
    config = read_config(source.path)
    architectures.check_source(config, source_spec, rewriter.source_layouts)
    rewriter.setup(config)
    check_output(out, options.overwrite)
    reader = CheckpointReader(source.path, options.allow_pickle)
    dtype = output_dtype(options, config)
    device = options.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ReheadError(f"--device {device}: CUDA is not available here; use --device cpu")

    tokenizer = load_tokenizer(options, source)
    calib_ids = None
    if tokenizer is None:
        if rewriter.needs_calibration or options.check_identity:
            raise ReheadError(
                f"{source_spec}: no tokenizer, and this conversion calibrates on text; pass --tokenizer "
                "with a checkpoint or Hub id that has the same tokenizer"
            )
        log.warning("%s has no tokenizer: the output will have none either (add one before using it)", source_spec)
    elif rewriter.needs_calibration or options.check_identity:
        calib_ids = text.blocks(tokenizer, options.calib, options.calib_tokens, options.calib_seq_len)

    layer_names: dict[int, list[str]] = {}
    other_names = []
    for name in reader.names():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints stored; transformers recomputes it
        match = LAYER_RE.match(name)
        (layer_names.setdefault(int(match.group(1)), []) if match else other_names).append(name)
    n_layers = config["num_hidden_layers"]
    if sorted(layer_names) != list(range(n_layers)):
        raise ReheadError(f"{source_spec}: weights hold layers {sorted(layer_names)}, config.json says {n_layers}")

    llama_config = architectures.llama_config(config)
    llama_config._attn_implementation = "sdpa"
    # the source's file hashes (for rehead.json) are computed beside the conversion: hashlib frees the GIL
    with ThreadPoolExecutor(1) as pool, atomic_output(out, options.overwrite) as tmp:
        hashes = pool.submit(reader.file_hashes)
        writer = ShardWriter(tmp, int(options.max_shard_gb * (1 << 30)))

        def write(name: str, tensor: torch.Tensor | None, unchanged: bool) -> None:
            """Writes a tensor; an unchanged source tensor of the output dtype is copied byte for byte."""
            stored = reader.locate(name) if unchanged else None
            if stored is not None and (stored.dtype == STORED_DTYPES[dtype] or stored.dtype not in FLOATS):
                writer.add_stored(name, stored)
                return
            tensor = reader.get(name) if tensor is None else tensor
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)

        calibration, identity_errors = None, []
        for name in other_names:
            write(name, None, unchanged=True)
            if calib_ids is not None and name == "model.embed_tokens.weight":
                hidden = reader.get(name)[calib_ids].float().to(device)
                positions = torch.arange(calib_ids.shape[1], device=device).expand(len(calib_ids), -1)
                rotary = LlamaRotaryEmbedding(llama_config).to(device)
                calibration = Calibration(hidden, rotary(hidden, positions))

        def read_layer(index: int, everything: bool = True) -> dict[str, torch.Tensor]:
            prefix = f"model.layers.{index}."
            names = [n for n in layer_names[index] if everything or rewriter.needs_tensor(n.removeprefix(prefix))]
            return {k.removeprefix(prefix): v for k, v in reader.get_many(names).items()}

        if rewriter.needs_planning:  # a first pass on the source's own activations
            planning = Calibration(calibration.hidden.clone(), calibration.position_embeddings)
            for index in tqdm(range(n_layers), desc=f"plan {rewriter.layout}", unit="layer"):
                tensors = read_layer(index)
                original = rewriter.source_module(index, tensors, llama_config, device)
                rewriter.observe_layer(LayerInput(index, tensors, original, planning))
                planning.hidden = planning.run(original)
                del original, tensors
            rewriter.plan_budget()
            del planning

        for index in tqdm(range(n_layers), desc=f"convert → {rewriter.layout}", unit="layer"):
            prefix = f"model.layers.{index}."
            tensors = read_layer(index, everything=calibration is not None)  # the source layer runs on all
            layer = LayerInput(index, tensors)
            if calibration is not None:
                layer.source_layer = rewriter.source_module(index, tensors, llama_config, device)
                layer.calibration = calibration
            new = rewriter.rewrite_layer(layer)
            if calibration is not None:
                converted = rewriter.layer_module(index, new)
                if options.check_identity:
                    identity_errors.append(check_identity(index, layer.source_layer, converted, calibration))
                calibration.hidden = calibration.run(converted)
                del converted
            for name, tensor in new.items():
                write(prefix + name, tensor, unchanged=tensor is tensors.get(name))
            for name in layer_names[index]:  # what the rewriter did not read, it did not change
                if name.removeprefix(prefix) not in tensors:
                    write(name, None, unchanged=True)
            del layer, new, tensors
        reader.close()
        writer.finish()

        target = rewriter.target_config()
        target["dtype"] = str(dtype).removeprefix("torch.")
        target.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(target, indent=2, sort_keys=True) + "\n")
        rewriter.write_extras(tmp)
        for path in rewriter.layout_files:
            (tmp / path.name).write_text(path.read_text())
        copy_side_files(source.path, tmp)
        if tokenizer is not None and not (tmp / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(tmp)  # --tokenizer: the tokenizer the user named travels with the model
        provenance = {
            "rehead_version": rehead.__version__,
            "layout": rewriter.layout,
            "source": {
                "id": source.id,
                "revision": source.revision,
                "files": hashes.result(),
                **card_metadata(source.path, source.id),
                "query_heads": llama_config.num_attention_heads,
                "kv_cache_bytes_per_token_bf16": 2 * llama_config.num_hidden_layers
                * llama_config.num_key_value_heads * head_dim_of(config) * 2,
            },
            "options": options.model_dump(exclude={"overwrite", "device"}, by_alias=True),
            "calibration": None
            if calib_ids is None
            else {
                "text": options.calib,
                "tokens": calib_ids.numel(),
                "seq_len": calib_ids.shape[1],
                "sha256": text.ids_hash(calib_ids),
            },
            "plan": rewriter.plan(),
            "identity_error_per_layer": identity_errors or None,
        }
        (tmp / "rehead.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out
