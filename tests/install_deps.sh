#!/usr/bin/env bash
# Installs the Debian 12 packages kvwave builds and tests with, when any is missing.
# Idempotent; needs root (or sudo) only when something must be installed.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config
  libabsl-dev libtbb-dev libfaiss-dev libopenblas-dev libboost-dev librocksdb-dev
  libprotobuf-dev protobuf-compiler libgtest-dev libhnswlib-dev libspdlog-dev libcli11-dev
  libtoml11-dev libxxhash-dev libhiredis-dev redis-server
  python3-dev python3-numpy python3-pytest pybind11-dev python3-torch
  clang libclang-rt-14-dev gnuplot-nox
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "kvwave: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
