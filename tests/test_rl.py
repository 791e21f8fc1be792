"""examples/rl/: offline RL with a Decision Transformer, Aaren against attention.

- D4RL's normalized score formula, and its refusal of unusable references;
- the dataset format: save/load round trip, episode splitting (timesteps, returns-to-go),
  and clear errors (the scripts: exit status 2 with the message) for a missing file, a file
  of another kind, missing keys, mismatched rows, non-finite values, a last row that ends
  no episode, an unknown environment or model;
- training batches: DT's left-padded K windows, Aaren's whole trajectories from their start;
- the Aaren rollout (``aaren.hf.DecisionTransformerStream``, constant memory) chooses the
  actions that the converted model's full forward predicts over the same trajectory; the
  transformer's windowed rollout equals its full forward while the episode is shorter than K;
- a seconds-long run of the whole pipeline (make_datasets --quick, both models --quick,
  summarize) writes the datasets, the per-run JSON and summary.json (quick runs only with
  --include-quick; runs whose references are too close to normalize never), a rerun skips what is
  finished (also through run_table.py), and SAC resumed from its checkpoint rebuilds the
  same medium-replay data.
"""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")
pytest.importorskip("stable_baselines3")
pytest.importorskip("transformers")

from example_scripts import load_script  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_mod():
    return load_script("examples/rl/rl_data.py", "rl_data")


@pytest.fixture(scope="module")
def dt():
    load_script("examples/rl/rl_data.py", "rl_data")
    return load_script("examples/rl/decision_transformer.py", "rl_decision_transformer")


def toy_data(n=7, ends=(2, 6)):
    rng = np.random.default_rng(0)
    terminals = np.zeros(n, bool)
    terminals[ends[0]] = True
    timeouts = np.zeros(n, bool)
    timeouts[ends[1]] = True
    return {"observations": rng.normal(size=(n, 3)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
            "rewards": np.arange(1, n + 1, dtype=np.float32), "terminals": terminals,
            "timeouts": timeouts}


# --------------------------------------------------------------------------- score and data

def test_normalized_score_is_d4rls_formula(data_mod):
    assert data_mod.normalized_score(-20.0, -20.0, 3000.0) == pytest.approx(0.0)
    assert data_mod.normalized_score(3000.0, -20.0, 3000.0) == pytest.approx(100.0)
    np.testing.assert_allclose(data_mod.normalized_score([1000.0, 490.0], -20.0, 1000.0),
                               [100.0, 50.0])
    with pytest.raises(ValueError, match="must be above the random return"):
        data_mod.normalized_score(1.0, 5.0, 5.0)


def test_dataset_round_trip_and_episodes(data_mod, tmp_path):
    path = str(tmp_path / "d" / "toy.npz")
    data = toy_data()
    data["timeouts"][-1] = False  # save_dataset marks the last row as an episode end
    data["timeouts"][5] = True
    data_mod.save_dataset(path, data, {"env": "Hopper-v5"})
    back = data_mod.load_dataset(path)
    assert back["meta"] == {"env": "Hopper-v5"} and back["timeouts"][-1]
    trajs = data_mod.split_trajectories(back)
    assert [len(t["rewards"]) for t in trajs] == [3, 3, 1]
    assert [t["terminal"] for t in trajs] == [True, False, False]
    np.testing.assert_array_equal(trajs[1]["timesteps"], [0, 1, 2])
    np.testing.assert_allclose(trajs[0]["returns_to_go"], [6, 5, 3])
    np.testing.assert_allclose(data_mod.episode_returns(back), [6, 15, 7])


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("actions"), "missing keys"),
    (lambda d: d.__setitem__("rewards", d["rewards"][:-1]), "'observations' has shape"),
    (lambda d: d["observations"].__setitem__((1, 1), np.nan), "non-finite"),
    (lambda d: d["timeouts"].__setitem__(-1, False), "last row ends no episode"),
])
def test_malformed_dataset_is_refused(data_mod, change, message):
    data = toy_data()
    change(data)
    with pytest.raises(ValueError, match=message):
        data_mod.check_dataset(data, "toy.npz")


def test_bad_inputs_get_clear_errors(data_mod, dt, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"make_datasets.py.*DIR/<env>/<dataset>\.npz"):
        data_mod.load_dataset(str(tmp_path / "nope.npz"))
    # a file of another kind: named, with the expected format (not numpy's pickle message)
    readme = tmp_path / "README.md"
    readme.write_text("# not a dataset\n")
    with pytest.raises(ValueError, match=r"README\.md is not a \.npz archive: expected a "
                                         r"dataset \.npz of make_datasets\.py") as error:
        data_mod.load_dataset(str(readme))
    assert "pickle" not in str(error.value)
    with pytest.raises(ValueError, match="unknown environment 'Hopper-v4'.*Hopper-v5"):
        data_mod.make_env("Hopper-v4")
    with pytest.raises(ValueError, match="unknown model"):
        dt.build_model("lstm", 3, 2)
    # the scripts end with the message and exit status 2 (argparse's), not a traceback
    def script_error(main, argv):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err
    err = script_error(dt.main, ["--data", str(tmp_path / "x" / ".." / "missing.npz"),
                                 "--model", "aaren", "--out", str(tmp_path / "runs"), "--quick"])
    assert f"no dataset file {tmp_path / 'missing.npz'}: " in err and "DIR/<env>/" in err
    err = script_error(dt.main, ["--data", str(readme), "--model", "aaren",
                                 "--out", str(tmp_path / "runs"), "--quick"])
    assert "README.md is not a .npz archive" in err
    make = load_script("examples/rl/make_datasets.py", "rl_make_datasets")
    assert "unknown environment" in script_error(
        make.main, ["--env", "CartPole-v1", "--out", str(tmp_path / "data"), "--quick"])
    data_mod.save_dataset(str(tmp_path / "lonely" / "x.npz"), toy_data(), {"env": "Hopper-v5"})
    assert "references.json" in script_error(
        dt.main, ["--data", str(tmp_path / "lonely" / "x.npz"), "--model", "aaren",
                  "--out", str(tmp_path / "runs"), "--quick"])
    with pytest.raises(FileNotFoundError, match="references.json"):  # the function raises
        dt.load_inputs(dt.parser().parse_args(["--data", str(tmp_path / "lonely" / "x.npz"),
                                               "--model", "aaren", "--out", "runs"]))
    summarize = load_script("examples/rl/summarize.py", "rl_summarize")
    assert "no runs folder" in script_error(
        summarize.main, ["--runs", str(tmp_path / "none"), "--results", str(tmp_path / "r")])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r").exists()


def test_batches(data_mod, dt):
    trajs = data_mod.split_trajectories(toy_data())  # lengths 3, 4
    batches = dt.Batches(trajs, np.zeros(3, np.float32), np.ones(3, np.float32), 10.0)
    rng = np.random.default_rng(0)
    w = batches.windows(16, 5, rng)
    assert w["states"].shape == (16, 5, 3) and w["mask"][:, -1].all()  # left padding
    for i in range(16):
        n = int(w["mask"][i].sum())
        assert w["mask"][i, 5 - n:].all() and not w["mask"][i, :5 - n].any()
        ts = w["timesteps"][i, 5 - n:]
        assert torch.equal(ts, torch.arange(int(ts[0]), int(ts[0]) + n))
    p = batches.prefixes(6, rng)
    assert int(p["mask"].sum()) >= 6
    assert (p["timesteps"][:, 0] == 0).all() and (p["mask"][:, 0] == 1).all()
    first = p["returns_to_go"][:, 0, 0] * 10.0
    assert set(first.tolist()) <= {6.0, 22.0}  # whole trajectories: their full returns


# --------------------------------------------------------------------------- rollouts

@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_rollout_actions_equal_the_full_forward(dt, kind):
    model = dt.build_model(kind, 11, 3, hidden=32, layers=2, heads=2, max_ep_len=64, seed=3)
    if kind == "aaren":  # a trained-like query scale: a fresh one attends almost uniformly
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("query"):
                    p.normal_(std=3.0, generator=torch.Generator().manual_seed(4))
    model.eval()
    mean, std = np.zeros(11, np.float32), np.ones(11, np.float32)
    steps = 24
    r = dt.rollout(model, kind, "Hopper-v5", [5, 6, 7], 300.0, mean, std, 100.0,
                   context=steps, max_episode_steps=steps, record=True)
    t = r["states"].shape[1]
    assert t == max(r["lengths"]) and t > 3
    with torch.no_grad():
        full = dt.forward_actions(model, {"states": r["states"], "actions": r["actions"],
                                          "returns_to_go": r["returns_to_go"],
                                          "timesteps": r["timesteps"],
                                          "mask": torch.ones(r["timesteps"].shape, dtype=torch.long)})
    torch.testing.assert_close(r["actions"], full, rtol=0, atol=2e-5)
    np.testing.assert_allclose(r["returns_to_go"][:, 0, 0].numpy(), 3.0)
    assert torch.equal(r["timesteps"][0], torch.arange(t))


# --------------------------------------------------------------------------- end to end

def test_quick_pipeline_end_to_end(dt, tmp_path):
    make = load_script("examples/rl/make_datasets.py", "rl_make_datasets")
    summarize = load_script("examples/rl/summarize.py", "rl_summarize")
    out = make.main(["--out", str(tmp_path / "data"), "--quick"])
    meta = {}
    for name in ("medium", "medium-replay"):
        data = load_script("examples/rl/rl_data.py", "rl_data").load_dataset(
            os.path.join(out, name + ".npz"))
        meta[name] = data["meta"]
        assert data["observations"].shape[1] == 11 and data["actions"].shape[1] == 3
        assert np.abs(data["actions"]).max() <= 1.0
    assert meta["medium"]["dataset"] == "medium"
    log = json.load(open(os.path.join(out, "sac", "log.json")))
    step = meta["medium-replay"]["medium_checkpoint_step"]
    recorded = next(e["recorded_transitions"] for e in log if e["step"] == step)
    replay = np.load(os.path.join(out, "medium-replay.npz"))
    assert len(replay["rewards"]) == recorded == step  # every SAC step up to the checkpoint
    # SAC resumed from its last checkpoint (here: the end) rebuilds the same medium-replay
    old = dict(np.load(os.path.join(out, "medium-replay.npz")))
    for name in ("sac/done.json", "sac/recording.npz", "medium-replay.npz"):
        os.remove(os.path.join(out, name))
    make.main(["--out", str(tmp_path / "data"), "--quick"])
    new = np.load(os.path.join(out, "medium-replay.npz"))
    assert all(np.array_equal(old[k], new[k]) for k in old)
    refs = json.load(open(os.path.join(out, "references.json")))
    assert {"random_return", "expert_return", "random_returns", "expert_returns"} <= set(refs)
    # seconds-long SAC: its expert need not beat the random policy, so fix references here
    refs.update(random_return=0.0, expert_return=100.0)
    json.dump(refs, open(os.path.join(out, "references.json"), "w"))
    runs = str(tmp_path / "runs")
    results = {}
    for kind in ("aaren", "transformer"):
        results[kind] = dt.main(["--data", os.path.join(out, "medium.npz"), "--model", kind,
                                 "--seed", "1", "--out", runs, "--quick"])
        res = results[kind]
        assert len(res["returns"]) == 2 and len(res["curve"]) == 2
        np.testing.assert_allclose(res["normalized"], np.array(res["returns"]))  # refs 0, 100
        assert res["normalized_return"] == pytest.approx(np.mean(res["returns"]))
    again = dt.main(["--data", os.path.join(out, "medium.npz"), "--model", "aaren",
                     "--seed", "1", "--out", runs, "--quick"])
    assert again == json.loads(json.dumps(results["aaren"]))  # finished: read back
    assert make.main(["--out", str(tmp_path / "data"), "--quick"]) == out  # stages skipped
    assert all(r["quick"] for r in results.values())
    # quick runs are left out of the table unless asked for (smoke tests), then marked
    assert summarize.main(["--runs", runs, "--results", str(tmp_path / "plain")]) == []
    assert json.load(open(tmp_path / "plain" / "summary.json")) == []
    assert not (tmp_path / "plain" / "learning_curves.png").exists()
    records = summarize.main(["--runs", runs, "--results", str(tmp_path / "results"),
                              "--include-quick"])
    summary = json.load(open(tmp_path / "results" / "summary.json"))
    assert summary == json.loads(json.dumps(records)) and len(summary) == 2
    for rec in summary:
        assert {"env", "dataset", "model", "seeds", "normalized_return", "mean", "std"} <= set(rec)
        assert rec["quick"] is True
        assert rec["seeds"] == [1] and rec["std"] is None  # one seed: no spread
        assert rec["mean"] == pytest.approx(results[rec["model"]]["normalized_return"])
    assert (tmp_path / "results" / "learning_curves.png").stat().st_size > 0
    # the table's driver over the same folder: every stage finds its output and skips it
    table = load_script("examples/rl/run_table.py", "rl_run_table")
    table.main(["--work", str(tmp_path), "--quick", "--seeds", "1", "--datasets", "medium"])
    assert json.load(open(tmp_path / "results" / "summary.json")) == summary
    logs = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert logs.count("done already") == 2 and "SAC" not in logs


def run_record(quick=False, random_return=20.0, expert_return=350.0, score=50.0):
    return {"env": "Hopper-v5", "dataset": "medium", "model": "aaren", "seed": 0,
            "quick": quick, "normalized_return": score, "returns": [1.0], "train_seconds": 1.0,
            "references": {"random_return": random_return, "expert_return": expert_return,
                           "expert": "SAC"}, "config": {"steps": 10, "quick": quick}, "curve": []}


def test_summary_leaves_out_quick_runs_and_close_references():
    summarize = load_script("examples/rl/summarize.py", "rl_summarize")
    good = run_record()
    assert summarize.left_out_reason(good) is None
    assert "--quick" in summarize.left_out_reason(run_record(quick=True))
    assert summarize.left_out_reason(run_record(quick=True), include_quick=True) is None
    old_quick = run_record()
    del old_quick["quick"]
    old_quick["config"]["quick"] = True  # files written before the "quick" key: config says
    assert "--quick" in summarize.left_out_reason(old_quick)
    assert "no score" in summarize.left_out_reason(run_record(score=None))
    # a trial's quick references: expert 66.7 against random 65.7 (scores around -4000)
    close = run_record(random_return=65.7, expert_return=66.7, score=-4000.0)
    assert "too close" in summarize.left_out_reason(close, include_quick=True)
    # the threshold: a gap of 10% of the larger return's magnitude
    assert summarize.left_out_reason(run_record(random_return=90.0, expert_return=100.0)) is None
    assert "too close" in summarize.left_out_reason(run_record(random_return=91.0,
                                                               expert_return=100.0))
    records = summarize.summarize([good, run_record(quick=True), close])
    assert len(records) == 1 and records[0]["quick"] is False


def test_quick_table_refuses_the_repository_results(tmp_path, capsys):
    table = load_script("examples/rl/run_table.py", "rl_run_table")
    with pytest.raises(SystemExit) as exit_info:
        table.main(["--work", str(tmp_path), "--quick", "--results",
                    os.path.join(table.RESULTS_ROOT, "rl")])
    assert exit_info.value.code == 2
    assert "--quick writes smoke-test numbers" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
