#!/usr/bin/env bash
# On the device machine, from the repo root (one call): the GPU tests, torch's SDPA baseline and
# kvwave-decode-bench at batch 1 and 8; logs under $OUT (gpu_engine_*.txt). The binaries come
# packed (tools/device-pack) as .device/ge.tar.xz. Env: TESTS=0 skips the tests, BENCH=0 the
# benchmarks, CONTEXTS / CONTEXTS8 the context lengths of batch 1 / 8, ARGS extra bench args.
set -o pipefail
mkdir -p /tmp/pk && tar xJf .device/ge.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/ge/lib
B=/tmp/pk/ge/bin
T=$OUT/gpu_engine_tests.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu_engine_card.txt
if [ "${TESTS:-1}" = 1 ]; then
  for t in $(ls $B | grep _test); do
    echo "== $t" | tee -a $T
    timeout ${TEST_TIMEOUT:-150} $B/$t 2>&1 | grep -v '^\[ RUN\|^\[       OK' | tail -n 40 | tee -a $T
  done
fi
[ "${BENCH:-1}" = 1 ] || exit 0
[ -x $B/kvwave-decode-bench ] || exit 0
python3 bench/decode/sdpa_bench.py --contexts ${CONTEXTS:-32768,131072,524288,1048576} \
  --batch 1,8 2>&1 | tee $OUT/gpu_engine_sdpa.txt
timeout ${BENCH_TIMEOUT:-300} $B/kvwave-decode-bench --contexts ${CONTEXTS:-32768,131072,524288,1048576} \
  $ARGS 2>&1 | tee $OUT/gpu_engine_decode_b1.txt
timeout ${BENCH_TIMEOUT:-300} $B/kvwave-decode-bench --batch 8 --contexts ${CONTEXTS8:-32768,131072} \
  $ARGS 2>&1 | tee $OUT/gpu_engine_decode_b8.txt
