#!/usr/bin/env bash
# ETTh1 at the four horizons, both models, seeds 0 1 2 (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/tslib
for H in 96 192 336 720; do
  python examples/forecast.py --data-path ../shared/data/forecasting/ETTh1.csv.gz --horizon $H \
    --seeds 0 1 2 --d-model 64 --n-heads 4 --d-ff 256 \
    --json $OUT/ETTh1_$H.json --plot $OUT/ETTh1_$H.png
done
