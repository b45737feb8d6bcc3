#!/usr/bin/env bash
# Runs the GPU tests and the decode benchmark on the device machine (one call), logs under $OUT:
# batch 1 over all contexts, then batch 8 up to 128K. Usage (from the repo root there):
#   bash gpu/cuda/device_run.sh [extra bench args...]
# Env: SKIP_TESTS=1 skips the tests; CONTEXTS=... the batch-1 contexts; BATCH8=0 skips batch 8.
set -o pipefail
mkdir -p /tmp/pk && tar xJf .device/pk.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/pk/lib
B=/tmp/pk/pk/bin
T=$OUT/gpu_tests_h200.txt
[ "${SKIP_TESTS:-0}" = 1 ] && T=/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee $T
[ "${SKIP_TESTS:-0}" = 1 ] || for t in gpu_cuda_cuda_kernels_test gpu_cuda_wave_buffer_test \
  buffer_wave_policy_test; do
  echo "== $t" | tee -a $T
  timeout 120 $B/$t 2>&1 | tail -n 60 | tee -a $T
done
echo "== kvwave-decode-bench $*" | tee $OUT/decode_h200.txt
timeout ${BENCH_TIMEOUT:-300} $B/kvwave-decode-bench --json $OUT/decode_h200.json \
  ${CONTEXTS:+--contexts $CONTEXTS} "$@" 2>&1 |
  tee -a $OUT/decode_h200.txt
if [ "${BATCH8:-1}" = 1 ]; then
  echo "== kvwave-decode-bench --batch 8 --contexts 32768,131072 $*" | tee $OUT/decode_h200_b8.txt
  timeout ${BENCH_TIMEOUT:-300} $B/kvwave-decode-bench --batch 8 --contexts 32768,131072 \
    --json $OUT/decode_h200_b8.json "$@" 2>&1 | tee -a $OUT/decode_h200_b8.txt
fi
