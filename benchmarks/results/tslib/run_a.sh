#!/usr/bin/env bash
# The CPU runs of docs/results.md, first of two queues run side by side (one torch thread
# each): ETTh1 at the four horizons (seeds 0 1 2, 2 epochs), then weather at 96 and 336
# (seed 0, 1 epoch). d_model 64, 4 heads, 2 layers, d_ff 256; otherwise TSLib's recipe.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/tslib
DATA=../shared/data/forecasting
WIDTH="--d-model 64 --n-heads 4 --d-ff 256"
for H in 96 192 336 720; do
  python examples/forecast.py --data-path $DATA/ETTh1.csv.gz --horizon $H --seeds 0 1 2 \
    --epochs 2 $WIDTH --json $OUT/ETTh1_$H.json --plot $OUT/ETTh1_$H.png
done
for H in 96 336; do
  python examples/forecast.py --data-path $DATA/weather.csv.gz --horizon $H --seeds 0 \
    --epochs 1 $WIDTH --json $OUT/weather_$H.json --plot $OUT/weather_$H.png
done
