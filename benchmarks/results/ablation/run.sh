#!/usr/bin/env bash
# The ablation runs of docs/results.md ("Ablation: the stack without attention"), one
# process at a time, one torch thread each (the scripts' default), on the 2-core CPU.
#
#   benchmarks/results/ablation/run.sh [STAGE ...]      (default: every stage, in this order)
#   DATA=/path/to/data benchmarks/results/ablation/run.sh last
#
# DATA is the benchmark data folder (default ../shared/data from the project root).
# Stages:
#   last    ETTh1, H 96, --head last: the three models, 3 epochs, d_model 64, seeds 0 1 2
#   tslib   no-attention beside the TSLib tables of docs/results.md, at their settings
#           (1 epoch, d_model 64): ETTh1 at 96/192/336/720 and exchange_rate at 96/336,
#           seeds 0 1 2 (the Aaren and Transformer records are in ../tslib/)
#   tslib_long  the same beside ETTm1 and weather (four times ETTh1's windows): no-attention at
#           96 and 336, seeds 0 1 2; Aaren and the Transformer at 336, seeds 1 2 (their seed 0
#           and their 96 seeds 0-2 are in ../tslib/), written there as *_336_seeds12.json
#   uea     no-attention beside the UEA table: JapaneseVowels and Handwriting, seeds 0-4,
#           TSLib's classification recipe and sizes (as ../tslib/uea_*.json)
#   sktime  no-attention beside the sktime tables (examples/classify_timeseries.py:
#           BasicMotions, JapaneseVowels, ItalyPowerDemand, Airline, Lynx; seeds 0-4)
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=${DATA:-../shared/data}
OUT=benchmarks/results/ablation
FC="--d-model 64 --n-heads 4 --d-ff 256"
THREE="aaren transformer no-attention"

stage_last() {
  python examples/forecast.py --data-path "$DATA/forecasting/ETTh1.csv.gz" --horizon 96 \
    --head last --models $THREE --seeds 0 1 2 --epochs 3 $FC --json $OUT/ETTh1_96_last.json
}
stage_tslib() {
  for H in 96 192 336 720; do
    python examples/forecast.py --data-path "$DATA/forecasting/ETTh1.csv.gz" --horizon $H \
      --models no-attention --seeds 0 1 2 --epochs 1 $FC --json $OUT/tslib_ETTh1_$H.json
  done
  for H in 96 336; do
    python examples/forecast.py --data-path "$DATA/forecasting/exchange_rate.txt.gz" --horizon $H \
      --models no-attention --seeds 0 1 2 --epochs 1 $FC --json $OUT/tslib_exchange_rate_$H.json
  done
}
stage_tslib_long() {
  for name in ETTm1 weather; do
    for H in 96 336; do
      python examples/forecast.py --data-path "$DATA/forecasting/$name.csv.gz" --horizon $H \
        --models no-attention --seeds 0 1 2 --epochs 1 $FC --json $OUT/tslib_${name}_$H.json
    done
    python examples/forecast.py --data-path "$DATA/forecasting/$name.csv.gz" --horizon 336 \
      --seeds 1 2 --epochs 1 $FC --json benchmarks/results/tslib/${name}_336_seeds12.json
  done
}
stage_uea() {
  python examples/classify_uea.py --data-dir "$DATA" --datasets JapaneseVowels Handwriting \
    --models no-attention --seeds 0 1 2 3 4 --json $OUT/uea_no_attention.json
}
stage_sktime() {
  python examples/classify_timeseries.py --models no-attention --json $OUT/sktime_no_attention.json
}

ALL=(last tslib tslib_long uea sktime)
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${ALL[@]}")
for s in "${stages[@]}"; do  # every name checked before the first (long) stage runs
  case " ${ALL[*]} " in
    *" $s "*) ;;
    *) echo "usage: $0 [STAGE ...], stages (default: all, in this order): ${ALL[*]}" >&2
       [ "$s" = "-h" ] || [ "$s" = "--help" ] && exit 0
       echo "unknown stage: $s" >&2; exit 2 ;;
  esac
done
for s in "${stages[@]}"; do
  echo "== stage $s ($(date -u +%H:%M:%S) UTC)"
  "stage_$s"
done
