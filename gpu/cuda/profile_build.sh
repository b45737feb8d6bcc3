#!/usr/bin/env bash
# Builds kvwave-decode-bench-prof next to kvwave-decode-bench in a configured CUDA build dir: the
# same bench with scoring.cu compiled with -DKVWAVE_PROFILE_SELECT, which prints the SM cycles of
# each phase of the selection kernels (block 0) every 512 calls. A development aid; timings of
# that binary are perturbed by the periodic device synchronisation.
# Usage: bash gpu/cuda/profile_build.sh [build-dir]   (default build-cuda; after building there)
set -euo pipefail
BUILD=$(cd "${1:-build-cuda}" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$BUILD"
obj=gpu/cuda/CMakeFiles/kvwave_gpu_cuda.dir/scoring.cu.o
cc=$(ninja -t commands gpu/cuda/kvwave-decode-bench | grep -F "$obj -MF" | head -1)
cc=${cc/-DNDEBUG/-DNDEBUG -DKVWAVE_PROFILE_SELECT}
cc=${cc//$obj/$TMP/scoring.cu.o}
eval "$cc"
cp gpu/cuda/libkvwave_gpu_cuda.a "$TMP/lib.a"
(cd "$TMP" && ar r lib.a scoring.cu.o)
ln=$(ninja -t commands gpu/cuda/kvwave-decode-bench | grep -F -- "-o gpu/cuda/kvwave-decode-bench " | head -1)
ln=${ln/gpu\/cuda\/libkvwave_gpu_cuda.a/$TMP\/lib.a}
ln=${ln/-o gpu\/cuda\/kvwave-decode-bench /-o gpu\/cuda\/kvwave-decode-bench-prof }
eval "$ln"
echo "built $BUILD/gpu/cuda/kvwave-decode-bench-prof"
