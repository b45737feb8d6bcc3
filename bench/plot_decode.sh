#!/usr/bin/env bash
# Plots kvwave-decode-bench logs (bench/decode/decode_bench.cc): time per decode step (all 32
# layers) against context length, log-log, for the engine's GPU Attend, the bare wave buffer, full
# attention with the KV in HBM (our kernel, and torch SDPA from sdpa_bench.py's log) and streamed
# from pinned host memory; batch 8 rows as a second set of engine/SDPA points.
# usage: bash bench/plot_decode.sh OUT.png DECODE_B1.txt [DECODE_B8.txt] [SDPA.txt] [TITLE]
set -euo pipefail
out=$1
b1=$2
b8=${3:-}
sdpa=${4:-}
title=${5:-"kvwave-decode-bench: ms per decode step (32 layers, Llama-3-8B shape)"}
tsv=$(mktemp)
trap 'rm -f "$tsv"' EXIT
python3 - "$b1" "$b8" "$sdpa" >"$tsv" <<'PY'
import re, sys
series = {}
def add(name, ctx, ms):
    if ms is not None and ms > 0:
        series.setdefault(name, []).append((ctx, ms))
for path in sys.argv[1:3]:
    if not path:
        continue
    for line in open(path):
        m = re.match(r"\s*(\d+)\s+(\d+)\s+\d+/\d+\s+engine\s+([\d.]+) ms\s+wave\s+([\d.]+) ms", line)
        if not m:
            continue
        ctx, b, eng, wave = int(m[1]), int(m[2]), float(m[3]), float(m[4])
        add(f"batch {b}: engine (GPU Attend)", ctx, eng)
        if b == 1:
            add("batch 1: bare wave buffer", ctx, wave)
            f = re.search(r"full-hbm\s+(-?[\d.]+) ms\s+full-pcie\s+(-?[\d.]+) ms", line)
            if f:
                add("batch 1: full attention, KV in HBM (ours)", ctx, float(f[1]))
                add("batch 1: full attention, KV streamed from host", ctx, float(f[2]))
if sys.argv[3]:
    for line in open(sys.argv[3]):
        m = re.match(r"\s*(\d+)\s+(\d+)\s+sdpa\s+([\d.]+) ms/step", line)
        if m:
            add(f"batch {m[2]}: torch SDPA, KV in HBM", int(m[1]), float(m[3]))
for name, pts in series.items():
    print(f"context\t{name}")
    for c, ms in sorted(pts):
        print(f"{c}\t{ms}")
    print("\n")
PY
gnuplot -e "datafile='$tsv'; outfile='$out'; t='$title'" - <<'GP'
set terminal pngcairo size 1000,700 noenhanced
set output outfile
set title t
set logscale xy
set xlabel "context (tokens)"
set ylabel "ms per decode step (log)"
set xtics ("32K" 32768, "128K" 131072, "512K" 524288, "1M" 1048576)
set key top left
set xrange [25000:1400000]
set yrange [1:5000]
set grid
set datafile separator "\t"
plot for [i=0:*] datafile index i using 1:2 with linespoints pointsize 1 title columnheader(2)
GP
echo "wrote $out"
