#!/usr/bin/env bash
# Session 13 device call B: gpu-next's GPU tests; kvwave-ipc-bench under MPS at 128K batch 1 and
# 32K batch 4 (issue 17), torch SDPA in the same call.
set -o pipefail
S=$(date +%s)
mkdir -p /tmp/pk && tar xJf .device/pk.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/pk/lib
B=/tmp/pk/pk/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/info.txt
cat .device/PACK_INFO.txt | tee -a $OUT/info.txt
T=$OUT/tests.txt
for t in gpu_cuda_cuda_kernels_test buffer_wave_policy_test gpu_cuda_wave_buffer_test gpu_cuda_engine_gpu_test gpu_cuda_ipc_test; do
  s=$(date +%s); echo "== $t" | tee -a $T
  timeout 120 $B/$t 2>&1 | grep -v '^\[ RUN\|^\[       OK' | tail -n 14 | tee -a $T
  echo "rc ${PIPESTATUS[0]} ($(( $(date +%s) - s )) s)" | tee -a $T
done
echo "elapsed $(( $(date +%s) - S )) s" | tee -a $OUT/info.txt
M=$(command -v nvidia-cuda-mps-control)
echo "mps control: ${M:-none}" | tee $OUT/ipc_mps.txt
if [ -n "$M" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d 2>&1 | tee -a $OUT/ipc_mps.txt
  python3 bench/decode/sdpa_bench.py --contexts 131072 --batch 1 2>&1 | tee -a $OUT/ipc_mps.txt
  timeout 150 $B/kvwave-ipc-bench --contexts 131072 --batch 1 --steps 20 --warmup 5 2>&1 | tee -a $OUT/ipc_mps.txt
  echo "elapsed $(( $(date +%s) - S )) s" | tee -a $OUT/info.txt
  [ $(( $(date +%s) - S )) -lt 440 ] && timeout 120 $B/kvwave-ipc-bench --contexts 32768 --batch 4 --steps 10 --warmup 3 2>&1 | tee -a $OUT/ipc_mps.txt
  echo quit | nvidia-cuda-mps-control
fi
echo "elapsed $(( $(date +%s) - S )) s" | tee -a $OUT/info.txt
