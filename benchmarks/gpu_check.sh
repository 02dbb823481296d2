#!/usr/bin/env bash
# The GPU checks, in one run of at most ~8 minutes on a GPU machine (torch
# 2.11+cu130, nvcc 13.0, no network): rebuild the extension for sm_90a only,
# run the CUDA tests and the SASS test, build and run the C++ microbenchmarks
# (fused v2 and v1, the cuBLAS path, dense, with the copy and GEMM ceilings),
# print them against the performance model,
# run benchmarks/bench_ops.py --device cuda --quick if present, and print a
# results table last. Logs go to $OUT (if set) or ./gpu_check_logs.
#
#   PYTHON=python bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG=${OUT:-$ROOT/gpu_check_logs}
mkdir -p "$LOG"
PY=${PYTHON:-python}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export HF_HUB_OFFLINE=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
SUMMARY=$LOG/summary.txt
: > "$SUMMARY"

# step NAME SECONDS CMD...: runs CMD under a time limit, logs to $LOG/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ $rc -eq 124 ] && verdict="TIMEOUT(${limit}s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAIL(rc=$rc)"
  printf '%-14s %-14s %4ss  %s\n' "$name" "$verdict" $((SECONDS - t0)) "$LOG/$name.log" >> "$SUMMARY"
  return $rc
}

{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$LOG/env.log" 2>&1

step build 180 "$PY" setup.py build_ext --inplace
built=$?

tests=(python_tests/test_cuda.py python_tests/test_cuda_sass.py)
# test_ops.py needs hypothesis, which GPU machines may lack; its device
# fixture covers CUDA too.
if "$PY" -c "import hypothesis" 2>/dev/null && [ -f python_tests/test_ops.py ]; then
  tests+=(python_tests/test_ops.py)
fi
if [ $built -eq 0 ]; then
  step tests 150 "$PY" -m pytest -q -rfEs "${tests[@]}"
fi

# A build dir of its own: a CMake cache carried from another machine would
# point at that machine's paths.
BENCH_BUILD=${TMPDIR:-/tmp}/moka_bench_build
rm -rf "$BENCH_BUILD"
step cmake_build 45 bash -c "cmake -S . -B '$BENCH_BUILD' -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DMOKA_PYTHON='$PY' && cmake --build '$BENCH_BUILD' -j"
if [ -x "$BENCH_BUILD/bench_kron" ]; then
  step bench_cpp 60 "$BENCH_BUILD/bench_kron" --quick
fi

# The model's estimates for the same cells (benchmarks/kernel_model.py reads
# the planners through the simulator harness and the built kernels'
# registers through cuobjdump).
if [ -s "$LOG/bench_cpp.log" ]; then
  step model 120 "$PY" benchmarks/kernel_model.py --compare "$LOG/bench_cpp.log"
fi

if [ -f benchmarks/bench_ops.py ] && [ $built -eq 0 ]; then
  step bench_ops 50 "$PY" benchmarks/bench_ops.py --device cuda --quick
fi

echo
echo "== pytest =="
tail -n 15 "$LOG/tests.log" 2>/dev/null
echo
echo "== C++ microbenchmarks (T=8192) =="
grep -E "^(device|ceilings|pass)" "$LOG/bench_cpp.log" 2>/dev/null
grep -E " 8192 " "$LOG/bench_cpp.log" 2>/dev/null
echo
echo "== measured vs model (T=8192; model: benchmarks/kernel_model.py) =="
cat "$LOG/model.log" 2>/dev/null
echo
echo "== bench_ops.py --device cuda --quick =="
tail -n 25 "$LOG/bench_ops.log" 2>/dev/null
echo
echo "== steps =="
cat "$SUMMARY"
