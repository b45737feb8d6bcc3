#!/usr/bin/env bash
# Compares variants of the wave buffer's decode pipeline on the device machine (one call): the
# GPU tests, then kvwave-decode-bench at batch 1 per variant; logs under $OUT. Usage (from the
# repo root there): bash gpu/cuda/device_variants.sh [contexts]   (default 32768,131072)
set -o pipefail
mkdir -p /tmp/pk && tar xJf .device/pk.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/pk/lib
B=/tmp/pk/pk/bin
C=${1:-32768,131072}
T=$OUT/gpu_tests_h200.txt
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee $T
[ "${SKIP_TESTS:-0}" = 1 ] || for t in gpu_cuda_cuda_kernels_test gpu_cuda_wave_buffer_test buffer_wave_policy_test; do
  echo "== $t" | tee -a $T
  timeout 120 $B/$t 2>&1 | tail -n 40 | tee -a $T
done
V=$OUT/decode_variants_h200.txt
variant() {  # name, env assignment (or -), bench args...
  local name=$1 env=$2
  shift 2
  echo "== variant $name: ${env/-/} kvwave-decode-bench $*" | tee -a $V
  if [ "$env" = - ]; then
    timeout 240 $B/kvwave-decode-bench "$@" 2>&1 | tee -a $V
  else
    timeout 240 env "$env" $B/kvwave-decode-bench "$@" 2>&1 | tee -a $V
  fi
}
variant default - --contexts $C --steps 16
variant f32-scores - --bf16-scores 0 --contexts $C --steps 16
variant no-pdl - --pdl 0 --contexts $C --steps 16
variant unfused - --fuse 0 --contexts $C --steps 16
