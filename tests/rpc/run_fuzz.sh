#!/bin/sh
# Bounded libFuzzer run over kvwaved's frame + message decoding (rpc/fuzz/frame_fuzzer.cc) or its
# request handlers (rpc/fuzz/handler_fuzzer.cc, seeded by rpc/fuzz/handler_seeds.py).
# usage: run_fuzz.sh FUZZER_BINARY [SECONDS]   (registered as CTest tests when KVWAVE_FUZZ=ON)
set -eu
fuzzer=$1
seconds=${2:-30}
corpus=$(mktemp -d /tmp/kvwave-fuzz-corpus.XXXXXX)
trap 'rm -rf "$corpus" "$corpus.dict"' EXIT
case $(basename "$fuzzer") in
  *handler*)
    python3 "$(dirname "$0")/../../rpc/fuzz/handler_seeds.py" "$corpus"
    exec "$fuzzer" -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 "$corpus"
    ;;
esac
# Seeds: a Hello and a Ping frame (magic "KVW1", version 1).
printf '\001KVW1\001\000\001\000\001\000\000\000\000\000\000\000\004\000\000\000\000\000\000\000\010\001\020\001' > "$corpus/hello"
printf '\007KVW1\001\000\002\000\002\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000' > "$corpus/ping"
dict="$corpus.dict"
printf 'magic="KVW1"\nv1="\\x01\\x00"\n' > "$dict"
exec "$fuzzer" -max_total_time="$seconds" -rss_limit_mb=2048 -dict="$dict" -print_final_stats=1 "$corpus"
