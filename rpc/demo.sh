#!/usr/bin/env bash
# The README's main job: installs missing Debian packages, builds the daemon and the CLI, then
# `kvwave demo` starts kvwaved on its embedded defaults (a private socket), loads the real trace
# ../shared/data/traces/dd16k (synthetic data when it is absent, and says so), appends it, seals
# it, and reports Attend's output error, recall and latency against exact attention.
# Usage: bash rpc/demo.sh [kvwave demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install_deps.sh
build=${KVWAVE_BUILD_DIR:-build/release}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVWAVE_CUDA=AUTO >/dev/null
cmake --build "$build" -j "$(nproc)" --target kvwaved kvwave
exec "$build/client/kvwave" demo --kvwaved "$build/rpc/kvwaved" "$@"
