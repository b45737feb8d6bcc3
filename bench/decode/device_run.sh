#!/usr/bin/env bash
# On the device machine, from the repo root (one call): the GPU tests (the engine test three
# times), the shared model's trace replay (real vs AR(1) decode queries), torch's SDPA baseline and
# kvwave-decode-bench at batch 1 and 8; logs under $OUT. Carried: .device/$PACK.tar.xz (binaries,
# /work/shared/tools/device-pack, repacked with xz -9 to stay under the 64 MiB a call carries) and
# .device/lm.tar.xz (tar cJf of ../shared/data/lm: model-0000*.safetensors, qkdump.py, eval.u16).
# Env: PACK (ge), TESTS=0 / TRACE=0 / BENCH=0 skip a part, CONTEXTS / CONTEXTS8 the context
# lengths of batch 1 / 8, ARGS extra bench args.
set -o pipefail
export PYTHONUNBUFFERED=1
R=$(pwd)
P=${PACK:-ge}
mkdir -p /tmp/pk && tar xJf .device/$P.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/$P/lib
B=/tmp/pk/$P/bin
T=$OUT/tests.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $T
DUMP=
if [ "${TRACE:-1}" = 1 ] && [ -f .device/lm.tar.xz ]; then  # the model's dump beside the tests
  (tar xJf .device/lm.tar.xz -C /tmp && cd /tmp &&
    python3 lm/qkdump.py dump lm lm/eval.u16 65536 /tmp/dd64k >$OUT/qkdump.txt 2>&1) &
  DUMP=$!
fi
if [ "${TESTS:-1}" = 1 ]; then
  for t in gpu_cuda_cuda_kernels_test buffer_wave_policy_test gpu_cuda_wave_buffer_test \
    gpu_cuda_engine_gpu_test gpu_cuda_engine_gpu_test gpu_cuda_engine_gpu_test; do
    echo "== $t" | tee -a $T
    timeout 120 $B/$t 2>&1 | grep -v '^\[ RUN\|^\[       OK' | tail -n 40 | tee -a $T
    echo "rc ${PIPESTATUS[0]}" | tee -a $T
  done
fi
if [ -n "$DUMP" ] && wait $DUMP; then
  timeout 150 $B/kvwave-decode-bench --trace /tmp/dd64k --contexts 32768,65536 --decode 1024 2>&1 |
    tee $OUT/trace.txt
  rm -f /tmp/dd64k_*.npy
fi
[ "${BENCH:-1}" = 1 ] || exit 0
(python3 $R/bench/decode/sdpa_bench.py --contexts ${CONTEXTS:-32768,131072,524288,1048576} --batch 1 &&
  python3 $R/bench/decode/sdpa_bench.py --contexts ${CONTEXTS8:-32768,131072} --batch 8) 2>&1 |
  tee $OUT/sdpa.txt
timeout 200 $B/kvwave-decode-bench --contexts ${CONTEXTS:-32768,131072,524288,1048576} $ARGS 2>&1 |
  tee $OUT/decode_b1.txt
timeout 120 $B/kvwave-decode-bench --batch 8 --contexts ${CONTEXTS8:-32768,131072} $ARGS 2>&1 |
  tee $OUT/decode_b8.txt
