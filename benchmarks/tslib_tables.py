"""The Markdown tables of docs/results.md ("The paper's benchmarks on their real data") from
the JSON records that examples/forecast.py and examples/classify_uea.py wrote.

    python benchmarks/tslib_tables.py [benchmarks/results/tslib]

Per dataset (and horizon): mean +- sample standard deviation over seeds of each model, the
parameter counts, the mean training seconds, and whether Aaren's mean lies within one
standard deviation of the Transformer's (|difference| <= the larger of the two models'
standard deviations; with one seed there is no standard deviation and the verdict is "1 seed").
"""
import glob
import json
import os
import sys

import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_ETTH1_336 = {"mse": 0.65, "mae": 0.55}  # Feng et al. 2024, Aaren, ETTh1 horizon 336


def _records(folder: str, pattern: str) -> pd.DataFrame:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, pattern))):
        with open(path) as f:
            rows.extend(json.load(f))
    return pd.DataFrame(rows)


def _cell(s: pd.Series, digits: int, unit: str = "") -> str:
    """mean +- std, or the mean alone for one seed."""
    if s["n"] < 2:
        return f"{s['mean']:.{digits}f}{unit}"
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f}{unit}"


def _verdict(a: pd.Series, t: pd.Series) -> str:
    if a["n"] < 2 or t["n"] < 2:
        return "1 seed"
    return "yes" if abs(a["mean"] - t["mean"]) <= max(a["std"], t["std"]) else "no"


def forecasting_table(frame: pd.DataFrame) -> str:
    keys = ["dataset", "horizon"]
    lines = ["| dataset | H | Aaren MSE | Transformer MSE | within 1 std | Aaren MAE | "
             "Transformer MAE | within 1 std | params (A / T) | train s (A / T) | seeds |",
             "|---|---:|---:|---:|:-:|---:|---:|:-:|---:|---:|---:|"]
    order = {"ETTh1": 0, "ETTm1": 1, "weather": 2, "exchange_rate": 3}
    groups = sorted(frame.groupby(keys), key=lambda g: (order.get(g[0][0], 9), g[0][1]))
    for (name, horizon), g in groups:
        if set(g.model) != {"aaren", "transformer"}:
            continue  # a run still in progress: one model only so far
        stats = {}
        for metric in ("mse", "mae", "params", "train_seconds"):
            s = g.groupby("model")[metric].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
            stats[metric] = s.fillna(0.0)
        cells = []
        for metric in ("mse", "mae"):
            a, t = stats[metric].loc["aaren"], stats[metric].loc["transformer"]
            cells += [_cell(a, 3), _cell(t, 3), _verdict(a, t)]
        p, s = stats["params"]["mean"], stats["train_seconds"]["mean"]
        lines.append(f"| {name} | {horizon} | " + " | ".join(cells) +
                     f" | {int(p['aaren']):,} / {int(p['transformer']):,} | "
                     f"{s['aaren']:.0f} / {s['transformer']:.0f} | "
                     f"{int(stats['mse'].loc['aaren', 'n'])} |")
    return "\n".join(lines)


def classification_table(frame: pd.DataFrame) -> str:
    lines = ["| dataset | Aaren test accuracy | Transformer test accuracy | within 1 std | "
             "params (A / T) | train s (A / T) | epochs run (A / T) | seeds |",
             "|---|---:|---:|:-:|---:|---:|---:|---:|"]
    for name, g in frame.groupby("dataset", sort=False):
        if set(g.model) != {"aaren", "transformer"}:
            continue  # a run still in progress: one model only so far
        acc = (100 * g.set_index("model")["test_accuracy"]).groupby(level=0).agg(
            ["mean", "std", "count"]).rename(columns={"count": "n"}).fillna(0.0)
        means = g.groupby("model")[["params", "train_seconds", "epochs_run"]].mean()
        a, t = acc.loc["aaren"], acc.loc["transformer"]
        lines.append(f"| {name} | {_cell(a, 1, ' %')} | {_cell(t, 1, ' %')} | "
                     f"{_verdict(a, t)} | {int(means.loc['aaren', 'params']):,} / "
                     f"{int(means.loc['transformer', 'params']):,} | "
                     f"{means.loc['aaren', 'train_seconds']:.0f} / "
                     f"{means.loc['transformer', 'train_seconds']:.0f} | "
                     f"{means.loc['aaren', 'epochs_run']:.0f} / "
                     f"{means.loc['transformer', 'epochs_run']:.0f} | {int(a['n'])} |")
    return "\n".join(lines)


def main(folder: str) -> None:
    forecasts = _records(folder, "[!u]*.json")  # every forecasting record (not uea_*.json)
    if len(forecasts):
        print(forecasting_table(forecasts))
        etth1 = forecasts[(forecasts.dataset == "ETTh1") & (forecasts.horizon == 336)]
        if len(etth1):
            a = etth1[etth1.model == "aaren"]
            print(f"\nETTh1-336, Aaren: MSE {a.mse.mean():.3f} MAE {a.mae.mean():.3f} here; "
                  f"the paper: MSE {PAPER_ETTH1_336['mse']} MAE {PAPER_ETTH1_336['mae']}")
    classes = _records(folder, "uea_*.json")
    if len(classes):
        print()
        print(classification_table(classes))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "tslib"))
