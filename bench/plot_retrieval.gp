# Recall@k against scan fraction for every index of a `kvwave-bench retrieval` run.
# usage: gnuplot -e "datafile='X.png.tsv'; outfile='X.png'; plottitle='...'" plot_retrieval.gp
# The data file holds one block per index (two blank lines between), each headed by
# "scan_fraction<TAB>NAME"; kvwave-bench writes it next to the PNG.
if (!exists("plottitle")) plottitle = "recall vs scan fraction"
set terminal pngcairo size 1000,700 noenhanced
set output outfile
set title plottitle
set logscale x
set xlabel "scan fraction (keys scored / keys, log)"
set ylabel "recall@k"
set yrange [0:1.02]
set key bottom right
set grid
set arrow from graph 0, first 0.95 to graph 1, first 0.95 nohead dashtype 2 lc rgb "gray"
plot for [i=0:*] datafile index i using 1:2 with linespoints pointsize 0.8 title columnheader(2)
