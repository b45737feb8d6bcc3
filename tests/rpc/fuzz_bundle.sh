#!/bin/sh
# Packs the fuzzers of a KVWAVE_FUZZ build (and, optionally, the serve benchmark with two
# kvwaved binaries to compare) with every shared library they load and the dynamic loader, so that
# they run on another x86-64 Linux machine whatever its distribution (used to run the long
# fuzzing campaigns on an otherwise idle 16-core machine). The executables' interpreter is set to
# PREFIX/libs/ld-linux-x86-64.so.2: unpack with `tar xJf ARCHIVE -C $(dirname PREFIX)`.
# usage: fuzz_bundle.sh FUZZ_BUILD_DIR ARCHIVE PREFIX [EXTRA_EXECUTABLE...]
#   then on the other machine: PREFIX/run.sh SECONDS HANDLER_PROCS FRAME_PROCS
set -eu
build=$1
archive=$2
prefix=$3
shift 3
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
b="$work/$(basename "$prefix")"
mkdir -p "$b/libs" "$b/bin" "$b/seeds_handler" "$b/seeds_frame"
for f in "$build/rpc/rpc_handler_fuzzer" "$build/rpc/rpc_frame_fuzzer" "$@"; do
  name=$(basename "$f")
  [ -e "$b/bin/$name" ] && name="$(basename "$(dirname "$(dirname "$f")")")_$name"
  cp "$f" "$b/bin/$name"
  strip --strip-debug "$b/bin/$name"  # keeps the symbol table: reports still name functions
  patchelf --set-interpreter "$prefix/libs/ld-linux-x86-64.so.2" "$b/bin/$name"
  ldd "$f" | awk '/=>/ {print $3}' | xargs -I{} cp -L {} "$b/libs/"
done
cp -L /lib64/ld-linux-x86-64.so.2 "$b/libs/"
python3 "$src/rpc/fuzz/handler_seeds.py" "$b/seeds_handler"
printf '\001KVW1\001\000\001\000\001\000\000\000\000\000\000\000\004\000\000\000\000\000\000\000\010\001\020\001' > "$b/seeds_frame/hello"
printf '\007KVW1\001\000\002\000\002\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000' > "$b/seeds_frame/ping"
printf 'magic="KVW1"\nv1="\\x01\\x00"\n' > "$b/frame.dict"
cat > "$b/run.sh" <<'RUN'
#!/bin/sh
# run.sh SECONDS HANDLER_PROCS FRAME_PROCS: independent fuzzer processes (seed = index), one log
# each (h<i>.log, f<i>.log), crash inputs as art_h<i>-* / art_f<i>-*; prints the summed totals.
set -u
cd "$(dirname "$0")"
secs=$1; nh=$2; nf=$3
# The bundled libraries are for the fuzzers only: exported, they would replace the host's libc
# under its own tools (mkdir, sed), which then fail on a newer host.
L="$PWD/libs"
export ASAN_OPTIONS=symbolize=0
i=1; while [ $i -le "$nh" ]; do
  mkdir -p ch$i && cp seeds_handler/* ch$i/
  # Per-input leak checks (LSan) cost ~20x here: the engine's caches (host pool, prefix blocks,
  # background seals) leave allocations behind after most inputs, and libFuzzer then scans the
  # heap. So only the first LEAK_PROCS processes check leaks per input; the rest rely on the RSS
  # limit. -entropic=0: the entropic schedule's per-input feature bookkeeping cost ~3x.
  leaks=0; [ $i -le "${LEAK_PROCS:-2}" ] && leaks=1
  LD_LIBRARY_PATH="$L" ./bin/rpc_handler_fuzzer -max_total_time=$secs -seed=$i -rss_limit_mb=6000 -print_final_stats=1 \
    -entropic=0 -detect_leaks=$leaks -artifact_prefix=art_h$i- ch$i > h$i.log 2>&1 &
  i=$((i + 1))
done
i=1; while [ $i -le "$nf" ]; do
  mkdir -p cf$i && cp seeds_frame/* cf$i/
  LD_LIBRARY_PATH="$L" ./bin/rpc_frame_fuzzer -max_total_time=$secs -seed=$i -rss_limit_mb=2048 -print_final_stats=1 \
    -dict=frame.dict -artifact_prefix=art_f$i- cf$i > f$i.log 2>&1 &
  i=$((i + 1))
done
wait
for kind in h f; do
  ls $kind*.log > /dev/null 2>&1 || continue
  cat $kind*.log | awk -v k=$kind '/stat::number_of_executed_units/ {n += $2} /stat::average_exec_per_sec/ {r += $2}
    / cov: / {for (i = 1; i <= NF; i++) if ($i == "cov:" && $(i+1) + 0 > c) c = $(i+1) + 0}
    END {printf "%s: executions %d, sum of exec/s %d, max cov %d\n", (k == "h" ? "handler" : "frame"), n, r, c}'
done
ls art_* 2>/dev/null | sed 's/^/crash input: /'
RUN
chmod +x "$b/run.sh"
tar cJf "$archive" -C "$work" "$(basename "$prefix")"
ls -la "$archive"
