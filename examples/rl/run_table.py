"""The whole offline-RL table, resumable: datasets (make_datasets.py), every (dataset, model,
seed) Decision Transformer run (decision_transformer.py, --jobs at a time, one thread each),
then the summary and plot (summarize.py). Each stage skips what is finished, so rerunning
the same command continues an interrupted table.

    python examples/rl/run_table.py --work DIR [--results benchmarks/results/rl] [--jobs 2]
        [--envs Hopper-v5] [--seeds 0 1 2] [--datasets ...] [--models ...] [--quick]

Logs go to ``DIR/logs/``, the summary and plot to ``--results`` (default ``DIR/results/``).
``--quick`` is a smoke test of every stage (tiny budgets, seed 0 unless ``--seeds`` says
otherwise; a few minutes on 2 cores): its numbers mean nothing, so it refuses a ``--results``
inside the repository's benchmarks/results/, and its summary keeps its runs (marked
``"quick": true``) only where their references are far enough apart to normalize. Extra options after ``--dt`` go to every decision_transformer.py
run, e.g. ``--dt --steps 2000``.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from rl_data import check_env_name  # noqa: E402

DATASETS = ("medium", "medium-replay")
# The repository's results (benchmarks/results/): no --quick output goes there.
RESULTS_ROOT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "benchmarks", "results")


def inside(path, folder):
    """Whether ``path`` is ``folder`` or under it (both resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)
MODELS = ("aaren", "transformer")


def run(cmd, log):
    """Runs ``cmd`` with its output appended to ``log``; raises RuntimeError on failure."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}): see {log}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="datasets, runs and logs (outside the repo)")
    p.add_argument("--results", default=None, help="summary.json and plot (default WORK/results)")
    p.add_argument("--envs", nargs="+", default=["Hopper-v5"])
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="default 0 1 2; with --quick, 0")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke test of every stage (tiny budgets; numbers mean nothing)")
    p.add_argument("--dt", nargs=argparse.REMAINDER, default=[],
                   help="options for every decision_transformer.py run")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.quick and args.results and inside(args.results, RESULTS_ROOT):
        p.error(f"--quick writes smoke-test numbers: not into {os.path.normpath(args.results)} "
                f"(the repository's results); leave out --results (WORK/results) or pick "
                f"another folder")
    for env in args.envs:
        try:
            check_env_name(env)
        except ValueError as error:
            p.error(str(error))
    logs = os.path.join(args.work, "logs")
    os.makedirs(logs, exist_ok=True)
    py = sys.executable
    quick = ["--quick"] if args.quick else []
    data = os.path.join(args.work, "data")
    for env in args.envs:
        print(f"datasets for {env} ...", flush=True)
        run([py, os.path.join(HERE, "make_datasets.py"), "--env", env, "--out", data] + quick,
            os.path.join(logs, f"datasets_{env}.log"))
    jobs = [(env, ds, model, seed) for seed in args.seeds for env in args.envs
            for ds in args.datasets for model in args.models]

    def one(job):
        env, ds, model, seed = job
        run([py, os.path.join(HERE, "decision_transformer.py"),
             "--data", os.path.join(data, env, ds + ".npz"), "--model", model,
             "--seed", str(seed), "--out", os.path.join(args.work, "runs")] + quick + args.dt,
            os.path.join(logs, f"dt_{env}_{ds}_{model}_seed{seed}.log"))
        print(f"done: {env} {ds} {model} seed {seed}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, jobs))
    results = args.results or os.path.join(args.work, "results")
    run([py, os.path.join(HERE, "summarize.py"), "--runs", os.path.join(args.work, "runs"),
         "--results", results, "--copy-runs"] + (["--include-quick"] if args.quick else []),
        os.path.join(logs, "summarize.log"))
    with open(os.path.join(results, "summary.json")) as f:
        records = json.load(f)
    print(f"table in {results} ({len(records)} records)", flush=True)
    if not records:
        print(f"every run was left out of the table: see {os.path.join(logs, 'summarize.log')}",
              flush=True)
    return results


if __name__ == "__main__":
    main()
