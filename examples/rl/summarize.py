"""The offline-RL table from the per-run JSON files of decision_transformer.py: ``summary.json``
(a list of records ``{"env", "dataset", "model", "seeds", "normalized_return" (one per seed),
"mean", "std", "quick", ...}``; std is the sample standard deviation over seeds, null for one
seed; quick is true for --quick runs, kept only with --include-quick) and a plot
of the learning curves (normalized return against gradient steps, mean and min-max band over
seeds, one panel per env and dataset).

Left out of the table, the plot and ``--copy-runs`` (each one named on stderr, with the reason):

- ``--quick`` runs (smoke-test budgets: their scores mean nothing), unless ``--include-quick``;
  their records then carry ``"quick": true``;
- runs without a score (decision_transformer.py found the expert's reference return not
  above the random one);
- runs whose references are too close to normalize: expert minus random below
  ``MIN_REFERENCE_GAP`` (10%) of the larger of the two returns' magnitudes. The score is
  ``100 * (R - R_random) / (R_expert - R_random)``, so a small gap multiplies every return
  difference: with a gap under a tenth of the returns' size, one episode's return differing
  from the random policy's by that size (common) moves the score by over 1,000 points. A
  quick run's references (SAC trained for 300 steps: expert 66.7 against random 65.7) are
  such a case; the real run's (348.1 against 24.8) are far above it.

    python examples/rl/summarize.py --runs RUNS_DIR --results benchmarks/results/rl
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

# The smallest usable (expert - random) reference gap, as a fraction of
# max(|expert|, |random|): see the module docstring.
MIN_REFERENCE_GAP = 0.1


def is_quick(run):
    """Whether ``run`` (a per-run JSON of decision_transformer.py) was a ``--quick`` run: its
    ``"quick"`` key, or for older files the ``quick`` option in its config."""
    return bool(run.get("quick", run.get("config", {}).get("quick", False)))


def left_out_reason(run, include_quick=False):
    """Why ``run`` is left out of the table (a sentence), or None if it is kept."""
    if is_quick(run) and not include_quick:
        return "a --quick run (smoke-test budgets; --include-quick keeps it)"
    if run.get("normalized_return") is None:
        return "no score (the expert reference return is not above the random one)"
    refs = run["references"]
    expert, rand = float(refs["expert_return"]), float(refs["random_return"])
    if expert - rand < MIN_REFERENCE_GAP * max(abs(expert), abs(rand)):
        return (f"references too close to normalize (expert {expert:.1f}, random {rand:.1f}: "
                f"a gap under {MIN_REFERENCE_GAP:.0%} of the returns)")
    return None


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


def kept_runs(runs, include_quick=False):
    """``(kept, left_out)``: the runs that enter the table, and ``(run, reason)`` for the
    others (``left_out_reason``)."""
    kept, left_out = [], []
    for run in runs:
        reason = left_out_reason(run, include_quick)
        if reason is None:
            kept.append(run)
        else:
            left_out.append((run, reason))
    return kept, left_out


def summarize(runs, include_quick=False):
    """The summary records, one per (env, dataset, model), seeds in increasing order, of the
    runs that ``kept_runs`` keeps (quick runs, runs without a score and runs with references
    too close to normalize are left out)."""
    groups = {}
    for run in kept_runs(runs, include_quick)[0]:
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
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in group])),
            "quick": any(is_quick(r) for r in group)})
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
                   help="also copy each kept run's JSON (curves, returns, config) to RESULTS/runs/")
    p.add_argument("--include-quick", action="store_true",
                   help="keep --quick runs (smoke tests of the pipeline; their scores mean "
                        "nothing), marked \"quick\": true")
    args = p.parse_args(argv)
    try:
        all_runs = load_runs(args.runs)
    except FileNotFoundError as error:
        p.error(str(error))
    runs, left_out = kept_runs(all_runs, args.include_quick)
    for run, reason in left_out:
        print(f"left out: {run['env']} {run['dataset']} {run['model']} seed {run['seed']}: "
              f"{reason}", file=sys.stderr)
    records = summarize(runs, args.include_quick)
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
    print(f"{len(all_runs)} runs ({len(left_out)} left out), {len(records)} records -> "
          f"{args.results}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
