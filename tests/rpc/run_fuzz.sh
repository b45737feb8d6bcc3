#!/bin/sh
# Bounded libFuzzer run over kvwaved's frame + message decoding (rpc/fuzz/frame_fuzzer.cc).
# usage: run_fuzz.sh FUZZER_BINARY [SECONDS]   (registered as a CTest test when KVWAVE_FUZZ=ON)
set -eu
fuzzer=$1
seconds=${2:-30}
corpus=$(mktemp -d /tmp/kvwave-fuzz-corpus.XXXXXX)
trap 'rm -rf "$corpus" "$corpus.dict"' EXIT
# Seeds: a Hello and a Ping frame (magic "KVW1", version 1).
printf '\001KVW1\001\000\001\000\001\000\000\000\000\000\000\000\004\000\000\000\000\000\000\000\010\001\020\001' > "$corpus/hello"
printf '\007KVW1\001\000\002\000\002\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000' > "$corpus/ping"
dict="$corpus.dict"
printf 'magic="KVW1"\nv1="\\x01\\x00"\n' > "$dict"
exec "$fuzzer" -max_total_time="$seconds" -rss_limit_mb=2048 -dict="$dict" -print_final_stats=1 "$corpus"
