"""The tables of docs/results.md ("Ablation: the stack without attention") from the JSON
records in this folder (no-attention, and the three models with --head last) and in
../tslib/ (the Aaren and Transformer records of the TSLib tables, same settings).

    python benchmarks/results/ablation/tables.py

Cells are mean +- sample standard deviation over seeds. "no attn. vs A / T": how much
better Aaren and the Transformer are than the ablation; forecasting: the ablation's MSE
minus the model's, in % of the model's; classification: the model's accuracy minus the
ablation's, in points. Positive: the attention helps; negative: the ablation is better. A
difference is marked "*" where it exceeds twice its standard error, sqrt(s1^2 / n1 +
s2^2 / n2), and "~" where it does not (within the seed noise).
"""
import glob
import json
import math
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
TSLIB = os.path.join(HERE, "..", "tslib")
KINDS = ("aaren", "transformer", "no-attention")


def records(*patterns):
    out = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            with open(path) as f:
                data = json.load(f)
            out.extend(data["classification"] if isinstance(data, dict) else data)
    return out


def stats(values):
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else float("nan")), n


def cell(s, digits, scale=1.0):
    mean, sd, n = s
    if n < 2:
        return f"{scale * mean:.{digits}f} (1 seed)"
    return f"{scale * mean:.{digits}f} +- {scale * sd:.{digits}f}"


def versus(ablation, model, error=True):
    """An error: (ablation - model) in % of the model's mean; an accuracy: (model -
    ablation) in points. '*' beyond 2 standard errors of the difference, '~' within."""
    (ma, sa, na), (mm, sm, nm) = ablation, model
    diff = ma - mm if error else mm - ma
    se = math.sqrt(sa ** 2 / na + sm ** 2 / nm) if na > 1 and nm > 1 else float("nan")
    mark = "*" if se == se and abs(diff) > 2 * se else "~"
    return f"{100 * diff / mm:+.1f} %{mark}" if error else f"{100 * diff:+.1f}{mark}"


def forecasting(recs):
    key = lambda r: (r["dataset"], r["horizon"], r.get("config", {}).get("head", "time"),
                     r["config"]["epochs"])
    groups = {}
    for r in recs:
        groups.setdefault(key(r), {}).setdefault(r["model"], []).append(r)
    lines = ["| dataset | H | head | epochs | Aaren MSE | Transformer MSE | no attn. MSE | "
             "no attn. vs A / T (MSE) | Aaren MAE | Transformer MAE | no attn. MAE | params (A / T / no attn.) | seeds |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in sorted(groups, key=lambda k: (k[2] != "time", k[0], k[1])):
        g = groups[k]
        if "no-attention" not in g or not {"aaren", "transformer"} <= set(g):
            continue
        mse = {m: stats([r["mse"] for r in g[m]]) for m in KINDS}
        mae = {m: stats([r["mae"] for r in g[m]]) for m in KINDS}
        params = " / ".join(f"{g[m][0]['params']:,}" for m in KINDS)
        seeds = "/".join(str(len(g[m])) for m in KINDS)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | "
                     + " | ".join(cell(mse[m], 3) for m in KINDS)
                     + f" | {versus(mse['no-attention'], mse['aaren'])} / "
                       f"{versus(mse['no-attention'], mse['transformer'])} | "
                     + " | ".join(cell(mae[m], 3) for m in KINDS)
                     + f" | {params} | {seeds} |")
    return "\n".join(lines)


def classification(recs):
    groups = {}
    for r in recs:
        groups.setdefault(r["dataset"], {}).setdefault(r["model"], []).append(r)
    lines = ["| dataset | Aaren | Transformer | no attention | A / T minus no attn. (points) | params (A / T / no attn.) | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, g in groups.items():
        if set(g) != set(KINDS):
            continue
        acc = {m: stats([r["test_accuracy"] for r in g[m]]) for m in KINDS}
        lines.append(f"| {name} | " + " | ".join(cell(acc[m], 1, 100) + " %" for m in KINDS)
                     + f" | {versus(acc['no-attention'], acc['aaren'], error=False)} / "
                       f"{versus(acc['no-attention'], acc['transformer'], error=False)} | "
                     + " / ".join(f"{g[m][0]['params']:,}" for m in KINDS)
                     + " | " + "/".join(str(len(g[m])) for m in KINDS) + " |")
    return "\n".join(lines)


def main():
    print(forecasting(records(os.path.join(HERE, "ETTh1_96_last.json"),
                              os.path.join(HERE, "tslib_*.json"),
                              os.path.join(TSLIB, "ETTh1_*.json"),
                              os.path.join(TSLIB, "ETTm1_*.json"),
                              os.path.join(TSLIB, "weather_*.json"),
                              os.path.join(TSLIB, "exchange_rate_*.json"))))
    print()
    print(classification(records(os.path.join(TSLIB, "uea_*.json"),
                                 os.path.join(HERE, "uea_no_attention.json"))))
    sk = records(os.path.join(HERE, "sktime_no_attention.json"))
    if sk:
        print("\nsktime datasets, no attention (the Aaren and Transformer columns: docs/results.md)")
        for name in dict.fromkeys(r["dataset"] for r in sk):
            accs = [r["test_accuracy"] for r in sk if r["dataset"] == name]
            params = next(r["params"] for r in sk if r["dataset"] == name)
            print(f"  {name}: {cell(stats(accs), 1, 100)} % ({len(accs)} seeds; "
                  f"{', '.join(f'{100 * a:.1f}' for a in accs)}), {params:,} params")
        path = os.path.join(HERE, "sktime_no_attention.json")
        with open(path) as f:
            fc = json.load(f)["forecasting"]
        for name in dict.fromkeys(r["dataset"] for r in fc):
            rs = [r for r in fc if r["dataset"] == name]
            print(f"  {name}: MSE {cell(stats([r['mse'] for r in rs]), 1)}, "
                  f"MAE {cell(stats([r['mae'] for r in rs]), 2)} ({len(rs)} seeds)")


if __name__ == "__main__":
    main()
