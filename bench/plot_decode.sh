#!/usr/bin/env bash
# Plots kvwave-decode-bench results: time per decode step against context length (log-log) for
# Attend, its roofline, full attention with the KV on the GPU and streamed from host memory.
# usage: bash bench/plot_decode.sh OUT.png BATCH1.json [BATCH8.json]
set -euo pipefail
out=$1
shift
tsv=$(mktemp)
trap 'rm -f "$tsv"' EXIT
python3 - "$@" >"$tsv" <<'PY'
import json, sys
for path in sys.argv[1:]:
    rows = json.load(open(path))["rows"]
    b = rows[0]["batch"]
    for key, name in [("attend_ms", "Attend"), ("attend_roofline_ms", "Attend roofline"),
                      ("full_gpu_ms", "full attention, KV on GPU"),
                      ("full_host_ms", "full attention, KV streamed from host")]:
        print(f"context\tbatch {b}: {name}")
        for r in rows:
            print(f"{r['context']}\t{r[key]}")
        print("\n")
PY
gnuplot -e "datafile='$tsv'; outfile='$out'" - <<'GP'
set terminal pngcairo size 1000,700 noenhanced
set output outfile
set title "kvwave-decode-bench on one H200: time per decode step (32 layers, Llama-3-8B shape)"
set logscale xy
set xlabel "context (tokens)"
set ylabel "ms per decode step (log)"
set xtics ("32K" 32768, "128K" 131072, "512K" 524288, "1M" 1048576)
set key bottom right
set xrange [20000:2500000]
set yrange [0.1:20000]
set grid
set datafile separator "\t"
plot for [i=0:*] datafile index i using 1:2 with linespoints pointsize 1 title columnheader(2)
GP
echo "wrote $out"
