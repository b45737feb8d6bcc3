#!/usr/bin/env bash
# Issue 17 on the device machine (from the repo root, one call): GPU client tests, kvwave-ipc-bench + torch SDPA, regression GPU
# tests, then the bench with the CUDA MPS control daemon (LAYERS_MPS layers). Logs under $OUT. Carried:
# .device/$PACK.tar.xz (/work/shared/tools/device-pack of kvwaved, gpu_cuda_ipc_test, kvwave-ipc-bench,
# libkvwave_c.so and the three regression GPU tests). Run 1 = this with LAYERS_MPS=8; run 2 = the MPS bench at 32.
set -o pipefail
export PYTHONUNBUFFERED=1
R=$(pwd)
mkdir -p /tmp/pk && tar xJf .device/${PACK:-g17}.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/${PACK:-g17}/lib
B=/tmp/pk/${PACK:-g17}/bin
T=$OUT/tests.txt
el() { echo "rc $1 ($(( $(date +%s) - $2 )) s)"; }
date -u | tee $T
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv | tee -a $T
s=$(date +%s); echo "== gpu_cuda_ipc_test" | tee -a $T
timeout 90 $B/gpu_cuda_ipc_test 2>&1 | grep -v '^\[ RUN\|^\[       OK' | tail -n 60 | tee -a $T
el ${PIPESTATUS[0]} $s | tee -a $T
s=$(date +%s); echo "== torch_ipc_test.py" | tee -a $T
KVWAVED=$B/kvwaved KVWAVE_C_LIB=$B/libkvwave_c.so timeout 60 python3 $R/tests/gpu_cuda/torch_ipc_test.py 2>&1 | tail -n 30 | tee -a $T
el ${PIPESTATUS[0]} $s | tee -a $T
s=$(date +%s)
timeout 120 $B/kvwave-ipc-bench --contexts 131072 --steps 20 2>&1 | tee $OUT/bench.txt
el ${PIPESTATUS[0]} $s | tee -a $OUT/bench.txt
timeout 40 python3 $R/bench/decode/sdpa_bench.py --contexts 131072 --batch 1 2>&1 | tee $OUT/sdpa.txt
for t in gpu_cuda_cuda_kernels_test gpu_cuda_wave_buffer_test gpu_cuda_engine_gpu_test; do
  s=$(date +%s); echo "== $t" | tee -a $T
  timeout 30 $B/$t 2>&1 | grep -v '^\[ RUN\|^\[       OK' | tail -n 8 | tee -a $T
  el ${PIPESTATUS[0]} $s | tee -a $T
done
M=$(command -v nvidia-cuda-mps-control)
echo "mps control: ${M:-none}" | tee $OUT/bench_mps.txt
if [ -n "$M" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d 2>&1 | tee -a $OUT/bench_mps.txt
  s=$(date +%s)
  timeout 80 $B/kvwave-ipc-bench --contexts 131072 --layers ${LAYERS_MPS:-32} --steps 20 2>&1 | tee -a $OUT/bench_mps.txt
  el ${PIPESTATUS[0]} $s | tee -a $OUT/bench_mps.txt
  timeout 30 python3 $R/bench/decode/sdpa_bench.py --contexts 131072 --batch 1 2>&1 | tee -a $OUT/bench_mps.txt
  echo quit | nvidia-cuda-mps-control
  tail -5 /tmp/mps_log/control.log >> $OUT/bench_mps.txt 2>/dev/null
fi
date -u
