#!/usr/bin/env bash
# Extra seeds (1 and 2) for ETTm1 at 96, side by side with run_c.sh. Same settings as run_a.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python examples/forecast.py --data-path ../shared/data/forecasting/ETTm1.csv.gz --horizon 96 \
  --seeds 1 2 --epochs 1 --d-model 64 --n-heads 4 --d-ff 256 \
  --json benchmarks/results/tslib/ETTm1_96_seeds12.json
