"""Decode throughput and KV-cache bytes of a source and its conversions, with the static cache.

    python scripts/bench_decode.py                  # smollm2-135m + MoH, DHA, GDA; batch 4, contexts 256 and 2048, fp32
    python scripts/bench_decode.py --paths          # each layout's decode path against its dense path, same model
    python scripts/bench_decode.py --kernels        # one DHA and one GDA layer, decode path on and off, by query length
    python scripts/bench_decode.py --compile --context 2048   # the decode step torch.compile'd (minutes per model)
    python scripts/bench_decode.py --device cuda --dtype bf16 --batch 32 --context 2048   # GPU

Every model decodes with the cache `generate(cache_implementation="static")` builds for it
(`_prepare_static_cache`: the layout's own `LayoutStaticCache` for rehead's layouts, transformers'
`StaticCache` for the source), sized for the context and the new tokens. One held-out sequence of
--context tokens is prefilled and its cache copied to every row of the batch (the prefill is not
timed; copying keeps a 2048-token context affordable on a CPU). Then --new decode steps, one token
per row each (the rows read different held-out text, so MoH routes them differently), are timed
*interleaved*: one step of each model in turn, so that a shared machine's load falls on all of
them alike. tokens/s = batch / step time, the median over the steps (and the best step).
KV bytes are the cache's own buffers: bytes per cached token, and MiB at --context.
Conversions are made into --work if missing.
"""

import argparse
import contextlib
import importlib
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

SWITCHES = {  # --paths: the module constant that turns a layout's decode path off, and its "off" value
    "dha": ("rehead.layouts.modeling_dha", "FUSED_QUERY_TOKENS", 0),
    "gda": ("rehead.layouts.modeling_gda", "DECODE_QUERY_TOKENS", 0),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def kv_bytes_per_token(cache, batch: int) -> float:
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / (batch * cache.layers[0].max_cache_len)


@contextlib.contextmanager
def switched(switch):
    """With ``switch`` (module, name, value): that module constant set to value, then restored."""
    if switch is None:
        yield
        return
    module, name, value = importlib.import_module(switch[0]), switch[1], switch[2]
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def cache_arg(model) -> str:
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


class Decoder:
    """One model's static cache after the prefill, and its timed decode steps."""

    def __init__(self, name, model, prompt, tokens, switch=None):
        self.name, self.model, self.tokens, self.switch = name, model, tokens, switch
        batch, new = tokens.shape
        self.context = prompt.shape[1]
        self.cache = model._prepare_static_cache("static", batch, self.context + new, None, {})
        single = model._prepare_static_cache("static", 1, self.context + new, None, {})
        with torch.no_grad(), switched(self.switch):
            model(prompt, use_cache=True, **{cache_arg(model): single})
        for index, layer in enumerate(single.layers):  # the prompt's cache in every row
            keys, values = layer.keys[:, :, : self.context], layer.values[:, :, : self.context]
            self.cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
        self.kv_per_token = kv_bytes_per_token(self.cache, batch)
        self.seconds = []
        self.forward = model.forward

    def step(self, i: int, device: str) -> None:
        batch = self.tokens.shape[0]
        position = torch.full((batch, 1), self.context + i, device=self.tokens.device)
        sync(device)
        started = time.perf_counter()
        with torch.no_grad(), switched(self.switch):
            self.forward(self.tokens[:, i : i + 1], position_ids=position, use_cache=True,
                         **{cache_arg(self.model): self.cache})
        sync(device)
        self.seconds.append(time.perf_counter() - started)


def run(entries, prompt, tokens, device: str, compile: bool = False) -> list[dict]:
    """Times ``entries`` [(name, model, switch)] interleaved; one row per entry. With ``compile``, the
    decode step is torch.compile'd in one graph (the prefill is not), and the first step compiles it."""
    decoders = [Decoder(name, model, prompt, tokens, switch) for name, model, switch in entries]
    for decoder in decoders:
        if compile:
            decoder.forward = torch.compile(decoder.model.forward, fullgraph=True)
        started = time.perf_counter()
        decoder.step(0, device)  # warm-up
        decoder.first_step = time.perf_counter() - started
    for i in range(1, tokens.shape[1]):
        for decoder in decoders:
            decoder.step(i, device)
    batch, context = tokens.shape[0], prompt.shape[1]
    rows = []
    for d in decoders:
        steps = d.seconds[1:]
        rows.append({"model": d.name, "cache": type(d.cache).__name__, "batch": batch, "context": context,
                     "compiled": compile, "first_step_s": d.first_step,
                     "decode_tokens_per_s": batch / statistics.median(steps), "best_tokens_per_s": batch / min(steps),
                     "kv_bytes": d.kv_per_token * batch * context, "kv_bytes_per_token": d.kv_per_token})
    return rows


def table(rows) -> str:
    base = rows[0]
    lines = [f"{'model':<14} {'cache':<18} {'tok/s':>8} {'ratio':>6} {'best':>8} {'ratio':>6} {'KV MiB':>8} "
             f"{'KV B/tok':>9} {'vs source':>9}"]
    for r in rows:
        lines.append(
            f"{r['model']:<14} {r['cache']:<18} {r['decode_tokens_per_s']:>8.2f} "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>6.3f} {r['best_tokens_per_s']:>8.2f} "
            f"{r['best_tokens_per_s'] / base['best_tokens_per_s']:>6.3f} {r['kv_bytes'] / 2**20:>8.1f} "
            f"{r['kv_bytes_per_token']:>9.0f} {r['kv_bytes'] / base['kv_bytes']:>9.3f}")
    return "\n".join(lines)


def kernels(device: str, batch: int, span: int = 2048, repeat: int = 20) -> None:
    """One attention layer at the SmolLM2 shape (576 wide, 9 query heads of 64) after ``span`` cached
    tokens, forward for 1..64 query tokens, with its decode path forced on and off: where the thresholds
    (FUSED_QUERY_TOKENS, DECODE_QUERY_TOKENS) come from. Best of ``repeat``, interleaved."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rehead.layouts.configuration_dha import DHAConfig
    from rehead.layouts.configuration_gda import GDAConfig
    from rehead.layouts.modeling_cache import LayoutStaticCache
    from rehead.layouts.modeling_dha import DHAAttention
    from rehead.layouts.modeling_gda import GDAAttention

    shape = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=1, head_dim=64)
    layers = {  # a DHA layer of the smollm2-135m plan (3 key heads, 1 value head); GDA with 3 noise heads
        "dha": (DHAAttention(DHAConfig(**shape, key_heads_per_layer=[3], value_heads_per_layer=[1],
                                       key_head_of_query=[[i // 3 for i in range(9)]],
                                       value_head_of_query=[[0] * 9]), 0), SWITCHES["dha"]),
        "gda": (GDAAttention(GDAConfig(**shape, gda_noise_heads=3), 0), SWITCHES["gda"]),
    }
    print(f"one attention layer, batch {batch}, {span} cached tokens: ms per forward (best of {repeat})")
    print(f"{'query tokens':>12} " + " ".join(f"{name + ' ' + path:>14}" for name in layers
                                               for path in ("decode path", "kernel")))
    for length in (1, 2, 4, 8, 16, 32, 64):
        best = []
        for attention, switch in layers.values():
            attention.config._attn_implementation = "sdpa"
            attention.to(device).eval()
            cache = LayoutStaticCache([(*attention.cache_heads, 64)], span + length)
            keys, values = attention.cache_heads
            cache.update(torch.randn(batch, keys, span, 64, device=device),
                         torch.randn(batch, values, span, 64, device=device), 0)
            hidden = torch.randn(batch, length, 576, device=device)
            rotary = LlamaRotaryEmbedding(config=attention.config).to(device)
            positions = torch.arange(span, span + length, device=device)[None].expand(batch, -1)
            embeddings = rotary(hidden, positions)
            mask = torch.ones(length, span + length, dtype=torch.bool, device=device).tril(span)[None, None]
            forced = {"on": (*switch[:2], 1 << 30), "off": switch}
            times = {key: float("inf") for key in forced}
            with torch.no_grad():
                for _ in range(repeat):
                    for key in times:
                        with switched(forced[key]):
                            sync(device)
                            started = time.perf_counter()
                            attention(hidden, embeddings, mask.expand(batch, 1, -1, -1), cache=cache)
                            sync(device)
                        times[key] = min(times[key], time.perf_counter() - started)
                        cache.layers[0].cumulative_length.fill_(span)
            best += [times["on"], times["off"]]
        print(f"{length:>12} " + " ".join(f"{t * 1e3:>14.3f}" for t in best))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="smollm2-135m")
    parser.add_argument("--layouts", default="moh,dha,gda")
    parser.add_argument("--work", default="runs/bench-train")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", default="4", help="batch sizes, comma-separated")
    parser.add_argument("--context", default="256,2048", help="context lengths, comma-separated")
    parser.add_argument("--new", type=int, default=16, help="decode steps timed per model (after one warm-up)")
    parser.add_argument("--text", default="shakespeare-heldout", help="prompt text (a text spec)")
    parser.add_argument("--paths", action="store_true", help="time each layout's decode path against its dense path")
    parser.add_argument("--kernels", action="store_true", help="time one DHA and one GDA layer by query length")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's decode step")
    parser.add_argument("--threads", type=int, help="torch threads (on a shared CPU, 1 keeps a descheduled thread "
                        "from stalling the other at every parallel op)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    if args.kernels:
        for batch in sizes(args.batch):
            kernels(args.device, batch)
        return 0

    from bench_common import conversions

    from rehead import models, text

    layouts = [x for x in args.layouts.split(",") if x and (not args.paths or x in SWITCHES)]
    specs = conversions(args.source, Path(args.work), layouts, calib_tokens=4096)
    if args.paths:
        specs.pop("source")
    loaded = {name: models.load(spec, args.dtype, args.device)[:2] for name, spec in specs.items()}
    tokenizer = next(iter(loaded.values()))[1]
    if args.paths:
        entries = [entry for name, (model, _) in loaded.items()
                   for entry in [(f"{name} dense", model, SWITCHES[name]), (f"{name} decode path", model, None)]]
    else:
        entries = [(name, model, None) for name, (model, _) in loaded.items()]

    rows = []
    print(f"{args.dtype} on {args.device}, {args.new} decode steps per model after one warm-up, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    for batch in sizes(args.batch):
        for context in sizes(args.context):
            ids = text.token_ids(tokenizer, args.text, context + batch * (args.new + 1)).to(args.device)
            prompt, tokens = ids[None, :context], ids[context:].view(batch, args.new + 1)
            started = time.perf_counter()
            block = run(entries, prompt, tokens, args.device, args.compile)
            compiled = ", compiled (first steps " + ", ".join(f"{r['first_step_s']:.0f}" for r in block) + " s)"
            print(f"\nbatch {batch}, context {context}{compiled if args.compile else ''} "
                  f"({time.perf_counter() - started:.0f} s)\n{table(block)}")
            rows += block
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
