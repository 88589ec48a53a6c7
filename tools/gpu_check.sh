#!/usr/bin/env bash
# kdext's GPU check: ONE prepared script for a lent H100/H200 (no package
# registry; torch with CUDA, nvcc, ninja, triton, pytest, hypothesis there).
#
#   1. installs carried wheels from bench/wheels/*.whl (liger-kernel, flashinfer-python) if present
#   2. builds kdext for sm_90 with all cores (pip install --no-build-isolation --no-deps .)
#   3. runs the CUDA tests (tests/test_cuda_kernels.py: CPU-vs-CUDA agreement, poisoned outputs, opcheck)
#   4. runs compute-sanitizer memcheck on a small case of every kernel (tools/sanitize_cuda.py)
#   5. benchmarks every op against torch eager, torch.compile and Liger (bench/bench_gpu.py),
#      measuring the device-to-device copy bandwidth first, and prints ONE table
#   5c. the sparse and fused LM-head ops: their CUDA tests, bench_sparse, bench_fused_linear at Liger's shape
#   6. if time is left: racecheck on the on-chip (cluster) kernels, the device-parametrized
#      property tests of tests/ on CUDA, the rows x V > 2^31 test
#
# Everything goes under $OUT (summary.txt, one log per stage, bench_gpu.{md,csv,json}).
# Every stage runs under `timeout`, within an overall deadline (KDEXT_CHECK_DEADLINE_S,
# default 530 s), so one hang cannot eat the lease. See bench/README_GPU.md.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
DEADLINE=${KDEXT_CHECK_DEADLINE_S:-530}
T0=$(date +%s)
PY=${PYTHON:-python}
STATUS=0

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - $(elapsed) )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$OUT/summary.txt"; }

# stage NAME MAX_SECONDS CMD...: runs CMD with a timeout of min(MAX, time left - 5),
# logs to $OUT/NAME.log, prints the log's tail, records the exit status.
stage() {
  local name=$1 max=$2
  shift 2
  local lim
  lim=$(left)
  lim=$(( lim - 5 ))
  if [ "$lim" -gt "$max" ]; then lim=$max; fi
  if [ "$lim" -lt 10 ]; then
    log "stage $name: SKIPPED (no time left)"
    return 124
  fi
  log "stage $name: start (limit ${lim}s)"
  timeout --kill-after=10 "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  if [ $rc -eq 0 ]; then log "stage $name: ok"; else log "stage $name: FAILED rc=$rc (see $name.log)"; STATUS=1; fi
  return $rc
}

log "kdext gpu_check in $ROOT, results in $OUT"
{
  nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tail -n 6
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo unknown)
log "device: $DEVICE"

# 1. carried wheels (no registry on the GPU machine)
if ls bench/wheels/*.whl > /dev/null 2>&1; then
  stage wheels 60 "$PY" -m pip install --no-deps --no-index bench/wheels/*.whl
else
  log "no wheels in bench/wheels (run bench/fetch_gpu_wheels.sh on a machine with PyPI and carry bench/wheels)"
fi

# 2. build for sm_90 with all cores
export TORCH_CUDA_ARCH_LIST=9.0 KDEXT_CUDA=1 MAX_JOBS=$(nproc)
if ! stage build 320 "$PY" -m pip install --no-build-isolation --no-deps -v .; then
  log "build failed: nothing else can run"
  exit 1
fi
# Tests and benchmarks import the installed package, not the source tree.
if ! (cd "$OUT" && "$PY" -c "import kdext, sys; print(kdext.__file__, kdext.BUILD_INFO); sys.exit(0 if kdext.BUILD_INFO['cuda'] else 1)") >> "$OUT/summary.txt" 2>&1; then
  log "the installed kdext has no CUDA kernels"
  exit 1
fi

# 3. the CUDA tests (the >2^31 indexing test is last, if time is left). --import-mode=importlib does
# not put tests/ on sys.path, where test_cuda_kernels.py finds the shared cases (tests/reference.py).
TESTS_PATH="$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
stage tests 150 bash -c "cd '$OUT' && PYTHONPATH='$TESTS_PATH' '$PY' -m pytest '$ROOT/tests/test_cuda_kernels.py' -q --maxfail=25 -m 'not slow' \
  --import-mode=importlib -p no:cacheprovider --junitxml='$OUT/tests.xml'"

# 4. compute-sanitizer memcheck (exact allocation bounds: caching allocator off)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null || echo "")
if [ -n "$SAN" ]; then
  stage memcheck 100 bash -c "cd '$OUT' && PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SAN' --tool memcheck \
    --error-exitcode 9 --print-limit 20 '$PY' '$ROOT/tools/sanitize_cuda.py'"
else
  log "compute-sanitizer not found: memcheck skipped"
fi

# 5. the benchmark: one table
BENCH_LIMIT=$(( $(left) - 70 ))
if [ $BENCH_LIMIT -gt 260 ]; then BENCH_LIMIT=260; fi
stage bench $BENCH_LIMIT bash -c "cd '$OUT' && '$PY' '$ROOT/bench/bench_gpu.py' --out '$OUT' \
  --budget-s $(( BENCH_LIMIT - 25 ))"

# 5b. sampling: kdext vs the sorted reference and FlashInfer (when its wheel was carried)
stage bench_top_p 60 bash -c "cd '$OUT' && '$PY' '$ROOT/bench/bench_top_p_sample.py' --device cuda --rows 256 \
  --csv '$OUT/top_p_sample_cuda.csv'"

# 5c. the sparse family (offline teacher) and the fused LM-head losses (issue 10): CUDA against the
# CPU / float64, then their benchmarks at GPU sizes: topk_logprobs at [4096, 128256]; the fused losses
# at Liger's benchmark shape (bf16, N = 8192, H = 4096, V = 128256), time and peak memory
stage tests_sparse_fused 90 bash -c "cd '$OUT' && PYTHONPATH='$TESTS_PATH' '$PY' -m pytest '$ROOT/tests/test_sparse.py' \
  '$ROOT/tests/test_fused_linear.py' -q -k cuda --maxfail=10 --import-mode=importlib -p no:cacheprovider"
stage bench_sparse 60 bash -c "cd '$OUT' && '$PY' '$ROOT/bench/bench_sparse.py' --device cuda --rows 4096 \
  --vocab 128256 --csv '$OUT/sparse_cuda.csv'"
stage bench_fused_linear 150 bash -c "cd '$OUT' && '$PY' '$ROOT/bench/bench_fused_linear.py' --device cuda --dtype bf16 \
  --rows 8192 --hidden 4096 --teacher-hidden 4096 --vocab 128256 --memory-rows 8192 --csv '$OUT/fused_linear_cuda.csv'"

# 6. extras while time is left
if [ -n "$SAN" ]; then
  stage racecheck 45 bash -c "cd '$OUT' && '$SAN' --tool racecheck --error-exitcode 9 --print-limit 20 \
    '$PY' '$ROOT/tools/sanitize_cuda.py' --only onchip"
fi
# The CPU property tests parametrized over devices (tests/conftest.py `device` fixture), on CUDA only.
stage tests_property 90 bash -c "cd '$OUT' && '$PY' -m pytest '$ROOT/tests' -q -k cuda -p no:cacheprovider \
  --ignore='$ROOT/tests/test_cuda_kernels.py'; rc=\$?; [ \$rc -eq 5 ] && echo 'no cuda-parametrized tests' && exit 0; exit \$rc"
stage tests_large 40 bash -c "cd '$OUT' && PYTHONPATH='$TESTS_PATH' '$PY' -m pytest '$ROOT/tests/test_cuda_kernels.py' -q -m slow \
  --import-mode=importlib -p no:cacheprovider"

echo
log "done in $(elapsed)s, status $STATUS ($DEVICE)"
grep -E "stage .*: (ok|FAILED|SKIPPED)" "$OUT/summary.txt"
if [ -f "$OUT/bench_gpu.md" ]; then cat "$OUT/bench_gpu.md"; fi
exit $STATUS
