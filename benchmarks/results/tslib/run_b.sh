#!/usr/bin/env bash
# The CPU runs of docs/results.md, second queue: JapaneseVowels (TSLib's classification
# recipe and sizes, 5 seeds), exchange_rate and ETTm1 at horizons 96 and 336 (seed 0, the
# forecasting settings of run_a.sh), then Handwriting (5 seeds).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/tslib
DATA=../shared/data/forecasting
FC="--epochs 1 --d-model 64 --n-heads 4 --d-ff 256"
python examples/classify_uea.py --datasets JapaneseVowels --seeds 0 1 2 3 4 \
  --json $OUT/uea_JapaneseVowels.json
for H in 96 336; do
  python examples/forecast.py --data-path $DATA/exchange_rate.txt.gz --horizon $H --seeds 0 $FC \
    --json $OUT/exchange_rate_$H.json --plot $OUT/exchange_rate_$H.png
done
for H in 96 336; do
  python examples/forecast.py --data-path $DATA/ETTm1.csv.gz --horizon $H --seeds 0 $FC \
    --json $OUT/ETTm1_$H.json --plot $OUT/ETTm1_$H.png
done
python examples/classify_uea.py --datasets Handwriting --seeds 0 1 2 3 4 \
  --json $OUT/uea_Handwriting.json
