#!/usr/bin/env bash
# Session 12 device call 1: A = base (b01abea: float32 centroid logits, staging read over PCIe by the
# gather), B = new (bf16-exact centroids + the engine's fused bf16 scoring, staging DMA'd); pairs
# alternating at 128K batch 1; base with bare buffers on bf16 scores; B's GPU tests; SDPA before
# and after; ipc batch 4 under MPS.
# Pack (on the build machine, from the gpu-next worktree): build kvwave-decode-bench, kvwave-ipc-bench,
# gpu_cuda_{cuda_kernels,wave_buffer,engine_gpu,ipc}_test and buffer_wave_policy_test; device-pack them
# into .device/pk with main's kvwave-decode-bench copied in as bin/kvwave-decode-bench-base; strip;
# tar cf - pk | xz -9 > .device/pk.tar.xz; run this from the repo root with carry [".device"].
set -o pipefail
export PYTHONUNBUFFERED=1
S=$(date +%s)
mkdir -p /tmp/pk && tar xJf .device/pk.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/pk/lib
B=/tmp/pk/pk/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/info.txt
nproc | tee -a $OUT/info.txt; grep -m1 "model name" /proc/cpuinfo | tee -a $OUT/info.txt
[ -f .device/pcie_probe.py ] && python3 .device/pcie_probe.py 2>&1 | tee -a $OUT/info.txt
python3 bench/decode/sdpa_bench.py --contexts 131072 --batch 1 2>&1 | tee $OUT/sdpa.txt
for v in -base "" -base ""; do
  echo "== kvwave-decode-bench$v" | tee -a $OUT/decode.txt
  timeout 80 $B/kvwave-decode-bench$v --contexts 131072 --full 0 --steps 20 --warmup 5 2>&1 | tee -a $OUT/decode.txt
done
echo "== kvwave-decode-bench-base --bf16 1" | tee -a $OUT/decode.txt
timeout 80 $B/kvwave-decode-bench-base --contexts 131072 --full 0 --steps 20 --warmup 5 --bf16 1 2>&1 | tee -a $OUT/decode.txt
python3 bench/decode/sdpa_bench.py --contexts 131072 --batch 1 2>&1 | tee -a $OUT/sdpa.txt
T=$OUT/tests.txt
for t in gpu_cuda_cuda_kernels_test buffer_wave_policy_test gpu_cuda_wave_buffer_test gpu_cuda_engine_gpu_test gpu_cuda_engine_gpu_test gpu_cuda_ipc_test; do
  s=$(date +%s); echo "== $t" | tee -a $T
  timeout 100 $B/$t 2>&1 | grep -v '^\[ RUN\|^\[       OK' | tail -n 14 | tee -a $T
  echo "rc ${PIPESTATUS[0]} ($(( $(date +%s) - s )) s)" | tee -a $T
done
echo "elapsed $(( $(date +%s) - S )) s" | tee -a $OUT/info.txt
[ $(( $(date +%s) - S )) -lt 470 ] || exit 0
M=$(command -v nvidia-cuda-mps-control)
echo "mps control: ${M:-none}" | tee $OUT/ipc_mps.txt
if [ -n "$M" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d 2>&1 | tee -a $OUT/ipc_mps.txt
  timeout 100 $B/kvwave-ipc-bench --contexts 32768 --batch 4 --steps 10 --warmup 3 2>&1 | tee -a $OUT/ipc_mps.txt
  echo quit | nvidia-cuda-mps-control
fi
echo "elapsed $(( $(date +%s) - S )) s" | tee -a $OUT/info.txt
