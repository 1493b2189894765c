"""The layer-streamed conversion engine that every layout's conversion runs through.

    for each decoder layer l:
        read l's tensors → statistics on l's calibration inputs → rewrite →
        run the *converted* layer on the inputs to get layer l+1's inputs → write l's tensors

Peak memory is one decoder layer plus the calibration activations, whatever the model's size.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from rehead import architectures, text
from rehead.checkpoint import FLOATS, STORED_DTYPES, CheckpointReader, ShardWriter, read_config
from rehead.errors import ReheadError
from rehead.files import atomic_output, check_output
from rehead.heads import LAYER_RE, head_dim_of
from rehead.layouts import layout_config
from rehead.provenance import CalibrationRecord, Provenance, SourceRecord
from rehead.sampled import Sampler
from rehead.sources import Source, card_metadata, resolve
from rehead.writer import finish

from .options import DTYPES, ConvertOptions
from .sensitivity import attention_fisher

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
    """A layout's conversion. Subclasses set the class attributes and override the hooks they need.

    ``Options``: the layout's options, a pydantic model extending ConvertOptions (its own fields become
    the layout's command-line flags); ``preset``: the options ``rehead pipeline`` and the benchmarks
    convert with; ``trainable``: what the pipeline's short tuning trains; ``probe_sequences`` and
    ``sensitivity``: see ``plan_pass``.
    """

    layout = ""
    Options: type[ConvertOptions] = ConvertOptions
    preset: dict = {}
    trainable = "all"
    needs_calibration = False
    needs_planning = False
    source_layouts: tuple[str, ...] = ()  # rehead layouts it also reads as a source (stock LLaMA forms always)
    probe_sequences = 0  # > 0: the planning pass first measures ``sensitivity`` on this many sequences
    sensitivity: list[torch.Tensor] | None = None

    def __init__(self, options: ConvertOptions):
        self.options = options
        self.source_config: dict = {}

    def check_source(self, config: dict, where: str) -> None:
        """Refuses a source this conversion cannot read (by default: anything but a LLaMA-family checkpoint)."""
        architectures.check_source(config, where, self.source_layouts)

    def setup(self, source_config: dict) -> None:
        """Checks the options against the source; raises ReheadError before anything is written.
        The base reads the source's shape: its LLaMA form and its query, KV and layer counts."""
        self.source_config = source_config
        self.llama = architectures.llama_config(source_config)
        self.heads, self.layers = self.llama.num_attention_heads, self.llama.num_hidden_layers
        self.kv = self.llama.num_key_value_heads or self.heads

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

    def outer_tensors(self, names: list[str], read) -> dict[str, torch.Tensor | None]:
        """The tensors outside the decoder layers to write, ``read(name)`` giving the source's: a new
        tensor, or None for the source's unchanged (by default every one of ``names`` unchanged)."""
        return dict.fromkeys(names)

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
    state = architectures.with_o_proj_bias(state, config)
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


def llama_values(llama_config) -> dict:
    """The source's LLaMA form as keyword arguments for a layout's config class."""
    values = llama_config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", "dtype"):
        values.pop(key, None)
    return values


@dataclass
class SourceReader:
    """What a conversion reads: the source, its config and LLaMA form, its tensors by layer, its tokenizer
    and calibration tokens."""

    source: Source
    config: dict
    llama: LlamaConfig
    reader: CheckpointReader
    layer_names: dict[int, list[str]]
    other_names: list[str]
    tokenizer: object = None
    calib_ids: torch.Tensor | None = None

    def read_layer(self, index: int, wanted=None) -> dict[str, torch.Tensor]:
        """Layer ``index``'s tensors, named relative to the layer (those ``wanted(name)`` accepts, if given)."""
        prefix = f"model.layers.{index}."
        names = [n for n in self.layer_names[index] if wanted is None or wanted(n.removeprefix(prefix))]
        return {k.removeprefix(prefix): v for k, v in self.reader.get_many(names).items()}


def open_source(source_spec: str, out: Path, options: ConvertOptions, rewriter: Rewriter) -> SourceReader:
    """Validates the source, the options and the output folder before anything is written."""
    source = resolve(source_spec, options.revision, options.allow_pickle)
    if out.resolve() == source.path.resolve():
        raise ReheadError(f"{out}: the output folder is the source; choose another one")
    config = read_config(source.path)
    rewriter.check_source(config, source_spec)
    rewriter.setup(config)
    check_output(out, options.overwrite)
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise ReheadError(f"--device {options.device}: CUDA is not available here; use --device cpu")
    reader = CheckpointReader(source.path, options.allow_pickle)
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
    llama = architectures.llama_config(config)
    llama._attn_implementation = "sdpa"
    job = SourceReader(source, config, llama, reader, layer_names, other_names, load_tokenizer(options, source))
    calibrates = rewriter.needs_calibration or options.check_identity
    if job.tokenizer is None and calibrates:
        raise ReheadError(
            f"{source_spec}: no tokenizer, and this conversion calibrates on text; pass --tokenizer "
            "with a checkpoint or Hub id that has the same tokenizer"
        )
    if job.tokenizer is None:
        log.warning("%s has no tokenizer: the output will have none either (add one before using it)", source_spec)
    elif calibrates:
        sampler = None
        if "self" in text.parts(options.calib):  # text sampled from the source itself
            sampler = Sampler(source.path, job.tokenizer, options.device, options.calib_seed,
                              allow_pickle=options.allow_pickle)
        job.calib_ids = text.blocks(job.tokenizer, options.calib, options.calib_tokens, options.calib_seq_len, sampler)
    return job


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


class TensorSink:
    """Writes the output's tensors into shards; an unchanged source tensor of the output dtype is copied
    byte for byte (in the kernel) without being read."""

    def __init__(self, reader: CheckpointReader, folder: Path, dtype: torch.dtype, max_shard_gb: float):
        self.reader, self.dtype = reader, dtype
        self.writer = ShardWriter(folder, int(max_shard_gb * (1 << 30)))

    def write(self, name: str, tensor: torch.Tensor | None, unchanged: bool) -> None:
        stored = self.reader.locate(name) if unchanged else None
        if stored is not None and (stored.dtype == STORED_DTYPES[self.dtype] or stored.dtype not in FLOATS):
            self.writer.add_stored(name, stored)
            return
        tensor = self.reader.get(name) if tensor is None else tensor
        self.writer.add(name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)


def write_outer_tensors(job: SourceReader, rewriter: Rewriter, sink: TensorSink, device: str) -> Calibration | None:
    """Writes the tensors outside the decoder layers; returns the first layer's calibration inputs (the
    source's embeddings)."""
    calibration = None
    for name, tensor in rewriter.outer_tensors(job.other_names, job.reader.get).items():
        sink.write(name, tensor, unchanged=tensor is None)
        if job.calib_ids is not None and name == "model.embed_tokens.weight":
            hidden = job.reader.get(name)[job.calib_ids].float().to(device)
            positions = torch.arange(job.calib_ids.shape[1], device=device).expand(len(job.calib_ids), -1)
            rotary = LlamaRotaryEmbedding(job.llama).to(device)
            calibration = Calibration(hidden, rotary(hidden, positions))
    return calibration


def sensitivity_pass(job: SourceReader, calibration: Calibration, sequences: int, device: str,
                     seed: int) -> list[torch.Tensor]:
    """Each layer's attention-output Fisher diagonal (rehead.convert.sensitivity) on the first calibration sequences."""
    norm = LlamaRMSNorm(job.llama.hidden_size, eps=job.llama.rms_norm_eps)
    norm.weight.data = job.reader.get("model.norm.weight").float()
    head = job.reader.get("lm_head.weight" if "lm_head.weight" in job.other_names else "model.embed_tokens.weight")
    position = tuple(t[:sequences] for t in calibration.position_embeddings)
    return attention_fisher(lambda i: build_layer(LlamaDecoderLayer, job.llama, i, job.read_layer(i), device),
                            job.llama.num_hidden_layers, calibration.hidden[:sequences], position, norm.to(device),
                            head.float().to(device), seed)


def plan_pass(job: SourceReader, rewriter: Rewriter, calibration: Calibration, device: str) -> None:
    """A first pass over the source's own activations, for rewriters that plan across layers."""
    planning = Calibration(calibration.hidden.clone(), calibration.position_embeddings)
    if rewriter.probe_sequences:  # the rewriter prices its options by their effect on the logits
        rewriter.sensitivity = sensitivity_pass(job, planning, rewriter.probe_sequences, device,
                                                rewriter.options.calib_seed)
    for index in tqdm(range(job.llama.num_hidden_layers), desc=f"plan {rewriter.layout}", unit="layer"):
        tensors = job.read_layer(index)
        original = rewriter.source_module(index, tensors, job.llama, device)
        rewriter.observe_layer(LayerInput(index, tensors, original, planning))
        planning.hidden = planning.run(original)
        del original, tensors
    rewriter.plan_budget()


def convert_pass(job: SourceReader, rewriter: Rewriter, sink: TensorSink, calibration: Calibration | None,
                 options: ConvertOptions) -> list[float]:
    """Rewrites and writes every layer; calibration runs the converted layers. Returns the identity
    errors per layer when ``--check-identity`` asks for them."""
    identity_errors = []
    for index in tqdm(range(job.llama.num_hidden_layers), desc=f"convert → {rewriter.layout}", unit="layer"):
        prefix = f"model.layers.{index}."
        # the source layer runs on calibration text: it needs all its tensors
        tensors = job.read_layer(index, None if calibration is not None else rewriter.needs_tensor)
        layer = LayerInput(index, tensors)
        if calibration is not None:
            layer.source_layer = rewriter.source_module(index, tensors, job.llama, options.device)
            layer.calibration = calibration
        new = rewriter.rewrite_layer(layer)
        if calibration is not None:
            converted = rewriter.layer_module(index, new)
            if options.check_identity:
                identity_errors.append(check_identity(index, layer.source_layer, converted, calibration))
            calibration.hidden = calibration.run(converted)
            del converted
        for name, tensor in new.items():
            sink.write(prefix + name, tensor, unchanged=tensor is tensors.get(name))
        for name in job.layer_names[index]:  # what the rewriter did not read, it did not change
            if name.removeprefix(prefix) not in tensors:
                sink.write(name, None, unchanged=True)
        del layer, new, tensors
    return identity_errors


def provenance(job: SourceReader, options: ConvertOptions, rewriter: Rewriter, hashes: dict[str, str],
               identity_errors: list[float]) -> Provenance:
    llama = job.llama
    ids = job.calib_ids
    layout = layout_config(job.config)  # a rehead source (GDA growth) caches what its layout says
    kv = [llama.num_key_value_heads] * llama.num_hidden_layers
    keys, values = layout.kv_heads_per_layer() if layout is not None else (kv, kv)
    return Provenance(
        layout=rewriter.layout,
        source=SourceRecord(
            id=job.source.id, revision=job.source.revision, files=hashes,
            **card_metadata(job.source.path, job.source.id), query_heads=llama.num_attention_heads,
            kv_cache_bytes_per_token_bf16=(sum(keys) + sum(values)) * head_dim_of(job.config) * 2,
        ),
        options=options.model_dump(exclude={"overwrite", "device"}, by_alias=True),
        calibration=None if ids is None else CalibrationRecord(
            text=options.calib, tokens=ids.numel(), seq_len=ids.shape[1], sha256=text.ids_hash(ids)),
        plan=rewriter.plan(),
        identity_error_per_layer=identity_errors or None,
    )


def convert(source_spec: str, out: Path, options: ConvertOptions, rewriter: Rewriter) -> Path:
    out = Path(out).expanduser()
    job = open_source(source_spec, out, options, rewriter)
    dtype = output_dtype(options, job.config)
    # the source's file hashes (for rehead.json) are computed beside the conversion: hashlib frees the GIL
    with ThreadPoolExecutor(1) as pool, atomic_output(out, options.overwrite) as tmp:
        hashes = pool.submit(job.reader.file_hashes)
        sink = TensorSink(job.reader, tmp, dtype, options.max_shard_gb)
        calibration = write_outer_tensors(job, rewriter, sink, options.device)
        if rewriter.needs_planning:
            plan_pass(job, rewriter, calibration, options.device)
        identity_errors = convert_pass(job, rewriter, sink, calibration, options)
        job.reader.close()
        sink.writer.finish()
        config = {**rewriter.target_config(), "dtype": str(dtype).removeprefix("torch.")}
        rewriter.write_extras(tmp)
        finish(tmp, config, provenance(job, options, rewriter, hashes.result(), identity_errors), job.source.path,
               job.tokenizer)
    return out
