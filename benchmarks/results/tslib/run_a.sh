#!/usr/bin/env bash
# The CPU runs of docs/results.md, first of two queues run side by side (one torch thread
# each): ETTh1 at the four horizons (seeds 0 1 2), then weather at 96 and 336 (seed 0).
# Forecasting: d_model 64, 4 heads, 2 layers, d_ff 256, ONE epoch (the CPU budget);
# otherwise TSLib's recipe.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/tslib
DATA=../shared/data/forecasting
FC="--epochs 1 --d-model 64 --n-heads 4 --d-ff 256"
for H in 96 192 336 720; do
  python examples/forecast.py --data-path $DATA/ETTh1.csv.gz --horizon $H --seeds 0 1 2 $FC \
    --json $OUT/ETTh1_$H.json --plot $OUT/ETTh1_$H.png
done
for H in 96 336; do
  python examples/forecast.py --data-path $DATA/weather.csv.gz --horizon $H --seeds 0 $FC \
    --json $OUT/weather_$H.json --plot $OUT/weather_$H.png
done
