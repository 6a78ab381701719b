#!/usr/bin/env bash
# A lent GPU session, staged: each stage has a deadline and writes its results into OUT_DIR as
# they are produced (logs tee'd line by line, benchmark JSON rewritten after every result), so
# a run that is cut off still returns what it measured.
#
#   benchmarks/gpu_session.sh OUT_DIR 1    # <= 5 min: facts, build, fast gpu tests, ResNet-50 rows
#   benchmarks/gpu_session.sh OUT_DIR 2    # <= 6 min: CUDA graph replay, the variants' hooks,
#                                          #   the >2^31-element tests, the full record
#   benchmarks/gpu_session.sh OUT_DIR 3    # compute-sanitizer memcheck/racecheck on a smoke run
#   benchmarks/gpu_session.sh OUT_DIR all  # 1, 2 and 3 in a row
#
# Stage 1 builds the package; later stages expect that build (run them on the same warm
# machine, or run stage 1 again). Files written (the GPU machine returns at most 8):
#   build.log (environment facts first)  stage1.log  bench-resnet50.json  stage2.log
#   cuda-graphs.json  variants-resnet50.json  bench-full.json  sanitizer.log
# Copy them to benchmarks/results/<date>_<gpu>_<sha>/ and commit: results that are not
# committed did not happen.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_session.sh OUT_DIR [1|2|3|all]}"
which="${2:-all}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

# run SECONDS LOG CMD...: the command under a deadline, its output appended to LOG as it comes.
run() {
  local secs=$1 log=$2
  shift 2
  echo "\$ $* (deadline ${secs}s)" >>"$log"
  timeout --signal=INT --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "[rc=$rc]" >>"$log"
}

stage1() {
  {
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    git rev-parse HEAD 2>/dev/null || echo "no git sha"
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -1
  } >"$out/build.log" 2>&1
  run 180 "$out/build.log" env FUSED_SAM_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    "$py" -m pip install -q --no-build-isolation --no-deps -e .
  "$py" -m fused_sam info >>"$out/build.log" 2>&1
  run 150 "$out/stage1.log" "$py" -m pytest -m gpu -q -p no:cacheprovider -k "not 2_pow_31" -ra
  run 40 "$out/stage1.log" "$py" -m pytest -q -p no:cacheprovider tests/test_integrations.py -k timm -ra
  run 60 "$out/stage1.log" "$py" benchmarks/record.py --device cuda --sets resnet50 --bases sgd \
    --sparsity 0 --no-e2e --repeat 50 --out "$out/bench-resnet50.json" \
    --note "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
}

stage2() {
  run 60 "$out/stage2.log" "$py" benchmarks/cuda_graphs.py --out "$out/cuda-graphs.json"
  run 60 "$out/stage2.log" "$py" -m fused_sam bench --variants --device cuda --params resnet50 \
    --out "$out/variants-resnet50.json"
  run 90 "$out/stage2.log" "$py" -m pytest -m gpu -q -p no:cacheprovider -k "2_pow_31" -ra
  run 200 "$out/stage2.log" "$py" benchmarks/record.py --device cuda \
    --sets resnet18,resnet50,vit_b,small1000 --bases sgd,adamw --sparsity 0.5 \
    --out "$out/bench-full.json" \
    --note "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
}

stage3() {
  local smoke=benchmarks/gpu_smoke.py
  run 100 "$out/sanitizer.log" compute-sanitizer --tool memcheck "$py" "$smoke"
  run 100 "$out/sanitizer.log" compute-sanitizer --tool racecheck "$py" "$smoke"
}

case "$which" in
  1) stage1 ;;
  2) stage2 ;;
  3) stage3 ;;
  all) stage1; stage2; stage3 ;;
  *) echo "unknown stage $which (1, 2, 3 or all)" >&2; exit 2 ;;
esac
