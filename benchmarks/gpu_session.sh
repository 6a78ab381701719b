#!/usr/bin/env bash
# Everything a lent GPU machine should do in one call, outputs into one folder:
# build the CUDA kernels, run the gpu-marked tests, record the GPU benchmarks.
#   benchmarks/gpu_session.sh OUT_DIR
# Then copy OUT_DIR/*.json into benchmarks/results/ and commit the log next to it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_session.sh OUT_DIR}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  git rev-parse HEAD 2>/dev/null || echo "no git sha"
  FUSED_SAM_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    "${PYTHON:-python3}" -m pip install -q --no-build-isolation --no-deps -e . && "${PYTHON:-python3}" -m fused_sam info
  "${PYTHON:-python3}" -m pytest -m gpu -q -p no:cacheprovider
  benchmarks/gpu.sh --out "$out/bench-gpu.json"
} 2>&1 | tee "$out/gpu-session.log"
