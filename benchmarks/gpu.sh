#!/usr/bin/env bash
# Record the GPU benchmarks into benchmarks/results/ (run from anywhere, on a machine with a
# CUDA GPU and the package installed with its native/Triton backends built).
#   benchmarks/gpu.sh                 # ResNet-18, ResNet-50, ViT-B; SGD and AdamW bases; e2e
#   benchmarks/gpu.sh --repeat 200    # extra arguments go to benchmarks/record.py
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python3}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')"
"${PYTHON:-python3}" -m fused_sam info
note="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)"
exec "${PYTHON:-python3}" benchmarks/record.py --device cuda --note "${note}" "$@"
