#!/usr/bin/env bash
# Nsight Compute on the device machine (one call): the wave buffer's scoring kernels at 128K,
# batch 1 (two launches each, after warm-up), with the speed-of-light, warp-state, launch and
# occupancy sections; output to $OUT/ncu_h200.txt. Usage (from the repo root there):
#   bash gpu/cuda/device_ncu.sh [kernel regex]
set -o pipefail
mkdir -p /tmp/pk && tar xJf .device/pk.tar.xz -C /tmp/pk || exit 1
export LD_LIBRARY_PATH=/tmp/pk/pk/lib
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
K=${1:-"SelectPlanKernel|TiledLogitsKernel|ExactKernel"}
timeout 300 "$NCU" --clock-control none -k "regex:$K" --launch-skip 96 --launch-count 6 \
  --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
  --section MemoryWorkloadAnalysis \
  /tmp/pk/pk/bin/kvwave-decode-bench --contexts 131072 --steps 2 --warmup 2 > $OUT/ncu_h200.txt 2>&1
echo "ncu rc $?"
tail -n 5 $OUT/ncu_h200.txt
