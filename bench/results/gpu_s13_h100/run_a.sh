#!/usr/bin/env bash
# Session 13 device call A (issue 16): base (main: float32 centroid logits, staging read over PCIe
# by the gather) vs new (gpu-next: bf16-exact centroids + fused bf16 select, staging DMA'd),
# alternating at 128K batch 1, torch SDPA before and after, same machine.
set -o pipefail
S=$(date +%s)
mkdir -p /tmp/pk && tar xJf .device/pk.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/pk/lib
B=/tmp/pk/pk/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/info.txt
nproc | tee -a $OUT/info.txt; grep -m1 "model name" /proc/cpuinfo | tee -a $OUT/info.txt
cat .device/PACK_INFO.txt | tee -a $OUT/info.txt
python3 bench/decode/sdpa_bench.py --contexts 131072 --batch 1 2>&1 | tee $OUT/sdpa.txt
for v in -base "" -base ""; do
  echo "== kvwave-decode-bench$v" | tee -a $OUT/decode.txt
  timeout 90 $B/kvwave-decode-bench$v --contexts 131072 --full 0 --steps 20 --warmup 5 2>&1 | tee -a $OUT/decode.txt
  echo "elapsed $(( $(date +%s) - S )) s" | tee -a $OUT/decode.txt
done
python3 bench/decode/sdpa_bench.py --contexts 131072 --batch 1 2>&1 | tee -a $OUT/sdpa.txt
[ $(( $(date +%s) - S )) -lt 420 ] || exit 0
for v in -base ""; do
  echo "== kvwave-decode-bench$v (round 3)" | tee -a $OUT/decode.txt
  timeout 90 $B/kvwave-decode-bench$v --contexts 131072 --full 0 --steps 20 --warmup 5 2>&1 | tee -a $OUT/decode.txt
  echo "elapsed $(( $(date +%s) - S )) s" | tee -a $OUT/decode.txt
done
