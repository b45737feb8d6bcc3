#!/usr/bin/env bash
# The README's test command: installs missing Debian packages, builds (release; the CUDA targets too when nvcc is there) and
# runs every test (GoogleTest under ctest, plus the Python tests). Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install_deps.sh
build=${KVWAVE_BUILD_DIR:-build/release}
jobs=${KVWAVE_JOBS:-$(nproc)}
# CUDA targets are compiled when nvcc is present (their GPU tests skip themselves without a GPU).
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVWAVE_CUDA=AUTO >/dev/null
cmake --build "$build" -j "$jobs"
# Every test runs once: a test that fails sometimes is a bug, never retried into a pass.
ctest --test-dir "$build" --output-on-failure -j "$jobs" --timeout 600
