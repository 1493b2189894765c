"""The layer-streamed conversion engine that every layout's conversion runs through.

    for each decoder layer l:
        read l's tensors → statistics on l's calibration inputs → rewrite →
        run the *converted* layer on the inputs to get layer l+1's inputs → write l's tensors

Peak memory is one decoder layer plus the calibration activations, whatever the model's size.
What the engine calls on a layout's rewriter, and when, is convert/rewriter.py's docstring.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from rehead import families, text, validate
from rehead.checkpoint import FLOATS, STORED_DTYPES, CheckpointReader, ShardWriter, read_config
from rehead.describe import kv_cache_bytes
from rehead.errors import ReheadError
from rehead.families.llama import LAYER_RE, head_dim_of
from rehead.files import atomic_output, check_disjoint, check_output
from rehead.layouts import layout_config
from rehead.layouts.modeling_stack import SourceDecoderLayer
from rehead.provenance import CalibrationRecord, Provenance, SourceRecord
from rehead.sampled import Sampler
from rehead.sources import Source, card_metadata, resolve
from rehead.writer import finish

from .options import CALIBRATION, DTYPES, ConvertOptions, flag
from .rewriter import Calibration, LayerInput, Rewriter, build_layer
from .sensitivity import attention_fisher

log = logging.getLogger("rehead.convert")
IDENTITY_TOLERANCE = 1e-4


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


def open_source(source_spec: str, out: Path, options: ConvertOptions,
                kind: type[Rewriter]) -> tuple[SourceReader, Rewriter]:
    """Validates the source, the options and the output folder before anything is written; the
    rewriter of ``kind`` for this source."""
    source = resolve(source_spec, options.revision, options.allow_pickle)
    check_disjoint(source.path, out)
    config = read_config(source.path)
    validate.check_source_config(config, source_spec)
    kind.check_source(config, source_spec)
    rewriter = kind(options, config)
    check_output(out, options.overwrite)
    validate.check_device(options.device)
    checkpoint = CheckpointReader(source.path, options.allow_pickle)
    validate.check_tensors(checkpoint, config, source_spec)
    reader = families.reader(config, checkpoint)  # LLaMA-form names
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
    llama = families.llama_config(config)
    llama._attn_implementation = "sdpa"
    job = SourceReader(source, config, llama, reader, layer_names, other_names, load_tokenizer(options, source))
    calibrates = rewriter.needs_calibration or options.check_identity
    unused = [flag(n) for n in sorted(options.model_fields_set)
              if (type(options).model_fields[n].json_schema_extra or {}) == CALIBRATION]
    if unused and not calibrates:  # --to mha --calib x: nothing reads the text
        log.warning("%s: this conversion (--to %s with these options) reads no calibration text; %s ha%s no effect",
                    ", ".join(unused), options.to, "they" if len(unused) > 1 else "it", "ve" if len(unused) > 1 else "s")
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
    return job, rewriter


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
    return attention_fisher(lambda i: build_layer(SourceDecoderLayer, job.llama, i, job.read_layer(i), device),
                            job.llama.num_hidden_layers, calibration.hidden[:sequences], position, norm.to(device),
                            head.float().to(device), seed)


def plan_pass(job: SourceReader, rewriter: Rewriter, calibration: Calibration, device: str) -> list:
    """A first pass over the source's own activations, for rewriters that plan across layers: what
    ``rewriter.allot`` gives each layer."""
    planning = Calibration(calibration.hidden.clone(), calibration.position_embeddings)
    layers = job.llama.num_hidden_layers
    sensitivity = [None] * layers
    if rewriter.probe_sequences:  # the rewriter prices its options by their effect on the logits
        sensitivity = sensitivity_pass(job, planning, rewriter.probe_sequences, device, rewriter.options.calib_seed)
    observations = []
    for index in tqdm(range(layers), desc=f"plan {rewriter.layout}", unit="layer"):
        tensors = job.read_layer(index)
        original = rewriter.source_module(index, tensors, job.llama, device)
        observations.append(rewriter.observe_layer(LayerInput(index, tensors, original, planning, sensitivity[index])))
        planning.hidden = planning.run(original)
        del original, tensors
    return rewriter.allot(observations)


def convert_pass(job: SourceReader, rewriter: Rewriter, sink: TensorSink, calibration: Calibration | None,
                 options: ConvertOptions, allotments: list | None) -> tuple[list, list[float]]:
    """Rewrites and writes every layer; calibration runs the converted layers. Returns every layer's
    plan, and the identity errors per layer when ``--check-identity`` asks for them."""
    plans, identity_errors = [], []
    for index in tqdm(range(job.llama.num_hidden_layers), desc=f"convert → {rewriter.layout}", unit="layer"):
        prefix = f"model.layers.{index}."
        # the source layer runs on calibration text: it needs all its tensors
        tensors = job.read_layer(index, None if calibration is not None else rewriter.needs_tensor)
        layer = LayerInput(index, tensors, allotment=allotments[index] if allotments is not None else None)
        if calibration is not None:
            layer.source_layer = rewriter.source_module(index, tensors, job.llama, options.device)
            layer.calibration = calibration
        new, plan = rewriter.rewrite_layer(layer)
        plans.append(plan)
        if calibration is not None:
            converted = rewriter.layer_module(index, new, plan)
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
    return plans, identity_errors


def provenance(job: SourceReader, options: ConvertOptions, rewriter: Rewriter, plans: list, hashes: dict[str, str],
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
            kv_cache_bytes_per_token_bf16=kv_cache_bytes(keys, values, head_dim_of(job.config)),
        ),
        options=options.model_dump(exclude={"overwrite", "device"}, by_alias=True),
        calibration=None if ids is None else CalibrationRecord(
            text=options.calib, tokens=ids.numel(), seq_len=ids.shape[1], sha256=text.ids_hash(ids)),
        plan=rewriter.summary(plans),
        identity_error_per_layer=identity_errors or None,
    )


def convert(source_spec: str, out: Path, options: ConvertOptions, kind: type[Rewriter]) -> Path:
    """Converts ``source_spec`` into ``out`` with a rewriter of ``kind``."""
    out = Path(out).expanduser()
    job, rewriter = open_source(source_spec, out, options, kind)
    dtype = output_dtype(options, job.config)
    # the source's file hashes (for rehead.json) are computed beside the conversion: hashlib frees the GIL
    with ThreadPoolExecutor(1) as pool, atomic_output(out, options.overwrite) as tmp:
        hashes = pool.submit(job.reader.file_hashes)
        sink = TensorSink(job.reader, tmp, dtype, options.max_shard_gb)
        calibration = write_outer_tensors(job, rewriter, sink, options.device)
        allotments = plan_pass(job, rewriter, calibration, options.device) if rewriter.needs_planning else None
        plans, identity_errors = convert_pass(job, rewriter, sink, calibration, options, allotments)
        job.reader.close()
        sink.writer.finish()
        config = {**rewriter.target_config(plans), "dtype": str(dtype).removeprefix("torch.")}
        rewriter.write_extras(tmp, plans)
        finish(tmp, config, provenance(job, rewriter.options, rewriter, plans, hashes.result(), identity_errors),
               job.source.path, job.tokenizer)
    return out
