"""The offline-RL table from the per-run JSON files of decision_transformer.py: ``summary.json``
(a list of records ``{"env", "dataset", "model", "seeds", "normalized_return" (one per seed),
"mean", "std"}``; std is the sample standard deviation over seeds, null for one seed) and a plot
of the learning curves (normalized return against gradient steps, mean and min-max band over
seeds, one panel per env and dataset).

    python examples/rl/summarize.py --runs RUNS_DIR --results benchmarks/results/rl
"""
import argparse
import glob
import json
import os
import sys

import numpy as np


def load_runs(runs_dir):
    """Every finished run (``<env>/<dataset>/<model>/seed<S>.json``) under ``runs_dir``, as a
    list of dicts. Raises FileNotFoundError if there is no such folder."""
    if not os.path.isdir(runs_dir):
        raise FileNotFoundError(f"no runs folder {runs_dir}: run decision_transformer.py first")
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*", "*", "*", "seed*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def summarize(runs):
    """The summary records, one per (env, dataset, model), seeds in increasing order; runs
    whose score is missing (references unusable, e.g. a --quick run) are left out."""
    groups = {}
    for run in runs:
        if run.get("normalized_return") is None:
            continue
        groups.setdefault((run["env"], run["dataset"], run["model"]), []).append(run)
    records = []
    for (env, dataset, model), group in sorted(groups.items()):
        group.sort(key=lambda r: r["seed"])
        scores = [float(r["normalized_return"]) for r in group]
        records.append({
            "env": env, "dataset": dataset, "model": model, "seeds": [r["seed"] for r in group],
            "normalized_return": scores, "mean": float(np.mean(scores)),
            "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
            "episodes_per_seed": len(group[0]["returns"]),
            "raw_return_mean": float(np.mean([np.mean(r["returns"]) for r in group])),
            "references": group[0]["references"],
            "gradient_steps": group[0]["config"]["steps"],
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in group]))})
    return records


def plot(runs, path):
    """Writes the learning curves of ``runs`` to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["env"], r["dataset"]) for r in runs})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    colors = {"aaren": "tab:blue", "transformer": "tab:orange"}
    for ax, (env, dataset) in zip(axes[0], panels):
        for model in sorted({r["model"] for r in runs}):
            group = [r for r in runs if (r["env"], r["dataset"], r["model"]) == (env, dataset, model)]
            group = [r for r in group if r["curve"] and r["curve"][0]["normalized_mean"] is not None]
            if not group:
                continue
            steps = [p["step"] for p in group[0]["curve"]]
            curves = np.array([[p["normalized_mean"] for p in r["curve"]] for r in group
                               if len(r["curve"]) == len(steps)])
            ax.plot(steps, curves.mean(0), marker="o", color=colors.get(model),
                    label=f"{model} ({len(curves)} seeds)")
            ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2, color=colors.get(model))
        ax.set_title(f"{env} {dataset}")
        ax.set_xlabel("gradient steps")
        ax.set_ylabel("normalized return")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="the --out folder of decision_transformer.py")
    p.add_argument("--results", required=True, help="where summary.json and the plot go")
    p.add_argument("--copy-runs", action="store_true",
                   help="also copy each run's JSON (curves, returns, config) to RESULTS/runs/")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    records = summarize(runs)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(records, f, indent=1)
    plot(runs, os.path.join(args.results, "learning_curves.png"))
    if args.copy_runs:
        for run in runs:
            dest = os.path.join(args.results, "runs", run["env"], run["dataset"], run["model"])
            os.makedirs(dest, exist_ok=True)
            with open(os.path.join(dest, f"seed{run['seed']}.json"), "w") as f:
                json.dump(run, f, indent=1)
    for r in records:
        std = "  n/a" if r["std"] is None else f"{r['std']:5.1f}"
        print(f"{r['env']:12s} {r['dataset']:14s} {r['model']:12s} "
              f"{r['mean']:7.1f} +- {std}  (seeds {r['seeds']})")
    print(f"{len(runs)} runs, {len(records)} records -> {args.results}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
