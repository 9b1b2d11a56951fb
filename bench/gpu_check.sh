#!/usr/bin/env bash
# Issue 19's checks on a GPU machine (CUDA torch, no network), in under 8 minutes:
#   1. the reference engine's CUDA path through its tests (pytest -m cuda: greedy answers equal the CPU's in
#      float32; a bfloat16 batch runs to its budget);
#   2. decode time per token of a Llama-3.1-8B-shaped model (random bfloat16 weights) at batch 1 and 32,
#      against the HBM floor (16 GB over the measured copy bandwidth), eager (the engine has no CUDA graphs).
#   bash bench/gpu_check.sh [OUT_DIR]        (PYTHON=... picks the interpreter; default .venv's, else python3)
# It needs llmserve's dependencies and service/gen (`make proto`) beside that interpreter's torch; results go to
# OUT_DIR (default $OUT, else bench/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench/results}}
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee "$out/gpu-device.txt"
timeout 240 "$python" -m pytest -q -p no:cacheprovider -m cuda -rs tests/engine/test_cuda.py 2>&1 \
  | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout 240 "$python" -m bench.gpu_decode --device cuda --shape llama-3.1-8b --batches 1 32 \
  --out "$out/gpu-decode.json" 2>&1 | tee "$out/gpu-decode.log"
decode=${PIPESTATUS[0]}
echo "tests exit $tests, decode exit $decode"
exit $((tests || decode))
