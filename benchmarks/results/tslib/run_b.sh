#!/usr/bin/env bash
# The CPU runs of docs/results.md, second queue: UEA classification (TSLib's recipe and
# sizes, 5 seeds), then exchange_rate (seed 0, 2 epochs) and ETTm1 (seed 0, 1 epoch) at
# horizons 96 and 336, at the forecasting width of run_a.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/tslib
DATA=../shared/data/forecasting
WIDTH="--d-model 64 --n-heads 4 --d-ff 256"
python examples/classify_uea.py --datasets JapaneseVowels Handwriting --seeds 0 1 2 3 4 \
  --json $OUT/uea.json
for H in 96 336; do
  python examples/forecast.py --data-path $DATA/exchange_rate.txt.gz --horizon $H --seeds 0 \
    --epochs 2 $WIDTH --json $OUT/exchange_rate_$H.json --plot $OUT/exchange_rate_$H.png
done
for H in 96 336; do
  python examples/forecast.py --data-path $DATA/ETTm1.csv.gz --horizon $H --seeds 0 \
    --epochs 1 $WIDTH --json $OUT/ETTm1_$H.json --plot $OUT/ETTm1_$H.png
done
