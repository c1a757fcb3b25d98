#!/usr/bin/env bash
# The serving engine's GPU checks and timings in one command, for whoever has a CUDA GPU (no session of
# ours has had one yet): bash scripts/gpu_check.sh [OUT_DIR]
# Needs a Python environment with a CUDA build of torch and this package (`pip install -e '.[test]'`);
# PYTHON overrides the interpreter. Writes OUT_DIR/{tests.txt, throughput.*, project.*}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-out}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

# 1. correctness on the GPU: the Triton selection against the torch reference, the server on CUDA against the CPU
"$PY" -m pytest -q -rs tests/kernels/test_triton_kernel.py tests/runtime/test_serve.py -k "cuda" 2>&1 | tee "$OUT/tests.txt"

# 2. throughput, Llama-3.1-8B's shape with RANDOM weights and codebooks (speed only): A²ATS with K/V in
#    pinned host memory vs full attention with the cache on the GPU; batches that do not fit are skipped
"$PY" -m a2ats bench throughput --random-weights --shape llama-3.1-8b --dtype bfloat16 --device cuda \
    --lengths 32768,131072 --batches 1,2,4,8,16 --systems a2ats-offload,a2ats-offload-x2,full-local \
    --steps 4 --out "$OUT"

# 3. the projection for the same shape and host, with the measurements beside it
"$PY" -m a2ats bench project --shape llama-3.1-8b --hardware h100-host --measured "$OUT/throughput.json" --out "$OUT"
