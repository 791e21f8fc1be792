#!/usr/bin/env bash
# Extra seeds (1 and 2) run after run_a.sh and run_b.sh with the time left, so that more
# rows have a standard deviation: exchange_rate at 96 and 336 and weather at 96 (this
# queue), ETTm1 at 96 (run_d.sh, side by side). Same settings as run_a.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/tslib
DATA=../shared/data/forecasting
FC="--epochs 1 --d-model 64 --n-heads 4 --d-ff 256"
for H in 96 336; do
  python examples/forecast.py --data-path $DATA/exchange_rate.txt.gz --horizon $H --seeds 1 2 $FC \
    --json $OUT/exchange_rate_${H}_seeds12.json
done
python examples/forecast.py --data-path $DATA/weather.csv.gz --horizon 96 --seeds 1 2 $FC \
  --json $OUT/weather_96_seeds12.json
