#!/usr/bin/env bash
# One lent-GPU session in one call: build, the gpu tests, the benchmarks, under one deadline.
#
#   FUSED_SAM_GIT_SHA=<sha> benchmarks/gpu_session.sh OUT_DIR          # on the GPU machine
#   benchmarks/gpu_session.sh --sha <sha> [--budget SECONDS] OUT_DIR
#   benchmarks/gpu_session.sh --dry-run OUT_DIR                        # on a CPU (tests do this)
#
# A lent GPU gives 15 minutes of machine time, start-up included, and at most 10 minutes per
# command, so everything runs in one call under a global deadline (--budget, default 480 s):
# each step's own limit is clamped to the time left, and a step with too little time left is
# skipped with the reason printed. Steps, most important first:
#
#   facts     date, GPU, driver, versions, the git sha                      -> session.log
#   build     the CUDA extension (skipped when fused_sam._C already has CUDA kernels, e.g. on
#             a second call to a warm machine)                                -> session.log
#   tests     pytest -m gpu -n 8 (pytest-xdist) with --durations             -> pytest.log
#   timm      the timm adapter test (timm imports there, not in CI)          -> pytest.log
#   resnet50  optimizer-side rows, ResNet-50, SGD base                       -> bench-resnet50.json
#   graphs    CUDA graph replay against eager (benchmarks/cuda_graphs.py)    -> cuda-graphs.json
#   variants  fused-sam bench --variants on ResNet-50                        -> variants-resnet50.json
#   full      ResNet-18/50, ViT-B, 1000 small tensors; SGD, AdamW; mask 0.5; end to end
#                                                                            -> bench-full.json
#
# Every result file is rewritten after each row (logs line by line), so a step cut off by its
# deadline still returns what it measured. The benchmark steps' own output goes to bench.log.
# Seven files in all (the GPU machine returns at most 8). The GPU machine gets a copy of the
# working tree without .git: pass the commit in (--sha or FUSED_SAM_GIT_SHA); without either
# the script asks git, and records "unknown" when there is none.
#
# --dry-run runs the same steps on the CPU at tiny sizes (Triton interpreted, the gpu tests
# collected but not run, the CUDA-only steps skipped with the reason printed), so the script is
# exercised by the default test suite (tests/test_gpu_session.py) between GPU sessions.
#
# Copy what comes back to benchmarks/results/<date>_<gpu>_<sha>/ and commit it: results that
# are not committed did not happen.
set -uo pipefail

usage() {
  sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
}

dry=0
budget=480
sha="${FUSED_SAM_GIT_SHA:-}"
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --sha) sha="${2:?--sha needs a value}"; shift ;;
    --sha=*) sha="${1#--sha=}" ;;
    --budget) budget="${2:?--budget needs a value}"; shift ;;
    --budget=*) budget="${1#--budget=}" ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *)
      if [ -n "$out" ]; then echo "one OUT_DIR, got $out and $1" >&2; exit 2; fi
      out="$1"
      ;;
  esac
  shift
done
if [ -z "$out" ]; then usage >&2; exit 2; fi
case "$budget" in
  '' | *[!0-9]*) echo "--budget takes whole seconds, got $budget" >&2; exit 2 ;;
esac
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.." || exit 2

deadline=$((SECONDS + budget))
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$sha" ]; then
  sha="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
fi
export FUSED_SAM_GIT_SHA="$sha"
log="$out/session.log"
: >"$log"
# Seconds kept back at the end (timeout's grace period before a kill, the summary), and the
# least time worth starting a step with.
reserve=8
min_step=10
summary=()
last_rc=""

say() {
  echo "$*" | tee -a "$log"
}

# step NAME LIMIT LOGFILE CMD...: CMD under min(LIMIT, time left), its output appended to
# LOGFILE as it comes; skipped, with the reason, when too little time is left.
step() {
  local name=$1 limit=$2 file=$3
  shift 3
  local left=$((deadline - SECONDS - reserve))
  if ((left < min_step)); then
    say "[$name] skipped: ${left}s left of the ${budget}s budget"
    summary+=("$name: skipped (no time left)")
    last_rc=skipped
    return 0
  fi
  local secs=$((limit < left ? limit : left))
  local shown="$*"
  say "[$name] \$ ${shown%%$'\n'*} (limit ${secs}s, ${left}s left)"
  echo "\$ $*" >>"$file"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=5 "$secs" "$@" >>"$file" 2>&1
  local rc=$?
  local note=""
  if ((rc == 124 || rc == 137)); then note=" (stopped at its ${secs}s limit)"; fi
  say "[$name] rc=$rc in $((SECONDS - t0))s$note"
  summary+=("$name: rc=$rc, $((SECONDS - t0))s$note")
  last_rc=$rc
  return 0
}

# skip NAME REASON: a step that does not apply here, said so.
skip() {
  say "[$1] skipped: $2"
  summary+=("$1: skipped ($2)")
}

gpu_name=""
if ((dry)); then
  # Tiny sizes on the CPU; Triton runs interpreted (its kernels must see this before import).
  export TRITON_INTERPRET=1
  device=cpu
  say "dry run on the CPU: tiny sizes, Triton interpreted, CUDA-only steps skipped"
else
  device=cuda
  gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
fi

# facts ---------------------------------------------------------------------------------------
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "git sha: $sha; budget ${budget}s; $(nproc) CPUs"
  if ((dry)); then
    echo "no GPU used (dry run)"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    nvcc --version 2>&1 | tail -1
  fi
} >>"$log" 2>&1
facts='import sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", tv, "gpu", torch.cuda.is_available())
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device visible: on a machine without one, run with --dry-run")'
step facts 60 "$log" "$py" -c "$facts" "$device"
if [ "$last_rc" != 0 ] && [ "$last_rc" != skipped ]; then
  say "the environment check failed (see $log): nothing else runs"
  exit 1
fi

# build ---------------------------------------------------------------------------------------
built='import sys
from fused_sam.backends import native
sys.exit(0 if native._C is not None and native._C.with_cuda else 1)'
build=(env FUSED_SAM_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)"
  "$py" -m pip install -q --no-build-isolation --no-deps --no-index -e .)
if ((dry)); then
  skip build "dry run: the CUDA build needs nvcc and a GPU (would run: ${build[*]})"
elif "$py" -c "$built" 2>/dev/null; then
  skip build "fused_sam._C already has CUDA kernels"
else
  step build 240 "$log" "${build[@]}"
fi
step info 30 "$log" "$py" -m fused_sam info

# tests ---------------------------------------------------------------------------------------
# -n 8: the Triton JIT compiles ~150-200 kernels, in parallel across workers; --dist loadgroup
# keeps the tests of one xdist_group (the > 2^31-element ones, ~25 GB each) on one worker.
tests=("$py" -m pytest -m gpu -n 8 --dist loadgroup -p no:cacheprovider -q -ra --durations=30)
if ((dry)); then
  say "[tests] dry run: collected, not run (the gpu tests need a CUDA device)"
  step tests 60 "$out/pytest.log" "${tests[@]}" --collect-only
else
  step tests 170 "$out/pytest.log" "${tests[@]}"
fi
# The timm adapter test: timm imports only where torchvision does (the GPU machines' image).
timm=("$py" -m pytest -p no:cacheprovider -q -ra tests/test_integrations.py -k timm)
if ((dry)); then
  step timm 40 "$out/pytest.log" "${timm[@]}" --collect-only
else
  step timm 40 "$out/pytest.log" "${timm[@]}"
fi

# benchmarks ----------------------------------------------------------------------------------
if ((dry)); then
  sets_big=tiny sets_full=tiny repeat=(--repeat 1 --warmup 0) variants=(--params tiny --repeat 1 --warmup 0)
  e2e=(--batch-size 4 --width 8 --warmup 0 --repeat 1)
else
  sets_big=resnet50 sets_full=resnet18,resnet50,vit_b,small1000 repeat=(--repeat 50)
  variants=(--params resnet50) e2e=()
fi
bench_log="$out/bench.log"
step resnet50 60 "$bench_log" "$py" benchmarks/record.py --device "$device" --sets "$sets_big" \
  --bases sgd --sparsity 0 --no-e2e "${repeat[@]}" --out "$out/bench-resnet50.json" \
  --note "$gpu_name"
if ((dry)); then
  skip graphs "dry run: CUDA graph capture needs a CUDA device"
else
  step graphs 60 "$bench_log" "$py" benchmarks/cuda_graphs.py --out "$out/cuda-graphs.json"
fi
step variants 60 "$bench_log" "$py" -m fused_sam bench --variants --device "$device" \
  "${variants[@]}" --out "$out/variants-resnet50.json"
step full 200 "$bench_log" "$py" benchmarks/record.py --device "$device" --sets "$sets_full" \
  --bases sgd,adamw --sparsity 0.5 "${e2e[@]}" --out "$out/bench-full.json" --note "$gpu_name"

# summary (last, so the end of the output says what happened) ----------------------------------
say ""
say "summary (git sha $sha, $SECONDS s of ${budget}s):"
for line in "${summary[@]}"; do say "  $line"; done
grep -E '(passed|failed|error|skipped|collected|deselected).* in [0-9.]+s' "$out/pytest.log" \
  2>/dev/null | sed 's/^/  pytest: /' | tee -a "$log"
ls "$out" | tr '\n' ' ' | sed 's/^/  files: /' | tee -a "$log"
echo | tee -a "$log"
