"""Quick-mode checks of the paper's claims, end to end (docs/results.md has the full runs).

- benchmarks/bench_streaming.py: the two stacks match in size and stream exactly like their
  parallel forward; Aaren's inference state is constant in the tokens seen while the
  Transformer's KV cache grows linearly; the script writes its CSV and PNG files.
- examples/classify_timeseries.py: the real datasets load from inside the installed
  sktime package with the network blocked; a few epochs on BasicMotions make the training
  loss fall and the test accuracy beat chance for both models; forecasting runs.
"""
import csv
import math
import os

import pytest
import torch

from example_scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_streaming.py", "bench_streaming")


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("sktime")
    pytest.importorskip("tqdm")
    load_script("benchmarks/bench_streaming.py", "bench_streaming")
    return load_script("examples/classify_timeseries.py", "classify_timeseries")


# --------------------------------------------------------------------------- efficiency


def test_stacks_same_size_and_step_matches_forward(bench):
    torch.manual_seed(0)
    e, layers = 32, 2
    aaren_stack, transformer, info = bench.build_stacks(e, 4, layers)
    # Same width and depth; the Transformer's W_q (E^2 + E per layer) is made up for by a
    # wider feed-forward in Aaren: the counts differ by less than E per layer.
    assert info["params_aaren"] == sum(p.numel() for p in aaren_stack.parameters())
    assert abs(info["params_aaren"] - info["params_transformer"]) < e * layers
    assert info["ffn_aaren"] > info["ffn_transformer"]
    _, _, unmatched = bench.build_stacks(e, 4, layers, match_params=False)
    assert unmatched["params_transformer"] - unmatched["params_aaren"] == layers * e * e

    x = torch.randn(2, 40, e)
    for model in (aaren_stack.eval(), transformer.eval()):
        with torch.no_grad():
            full = model(x)
            for mode in ("prealloc", "cat"):
                state = None if model is aaren_stack else model.new_state(mode)
                steps = []
                for t in range(x.size(1)):
                    y, state = model.step(x[:, t], state)
                    steps.append(y)
                torch.testing.assert_close(torch.stack(steps, 1), full, atol=2e-5, rtol=1e-4)


def test_streaming_memory_claim(bench):
    """Aaren's state bytes are the same after 1 and after 400 tokens; the KV cache holds
    exactly 2 (K and V) * layers * E * 4 bytes per token seen."""
    pytest.importorskip("tqdm")
    tokens, e, heads, layers = 400, 32, 4, 2
    a = bench.stream("aaren", tokens, e, heads, layers, progress=False)
    t = bench.stream("transformer", tokens, e, heads, layers, progress=False)
    assert a["tokens"] == t["tokens"] == bench.sample_points(tokens)
    assert a["tokens"][0] == 1 and a["tokens"][-1] == tokens
    per_layer = heads * 8 + e * 8  # lse [1, H] + out [1, H, E/H], float64 (docs/design.md)
    assert set(a["state_bytes"]) == {layers * per_layer}
    assert all(b == 2 * layers * e * 4 * n for b, n in zip(t["state_bytes"], t["tokens"]))
    assert all(alloc >= used for alloc, used in zip(t["state_allocated_bytes"], t["state_bytes"]))
    for r in (a, t):
        assert all(s > 0 and math.isfinite(s) for s in r["latency_s"])
        assert r["cumulative_s"] == sorted(r["cumulative_s"])
        assert all(p >= m > 0 for p, m in zip(r["peak_rss_bytes"], r["rss_bytes"]))


def test_bench_quick_writes_csv_and_plots(bench, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    results = bench.main(["--tokens", "256", "--d-model", "32", "--parallel-lengths", "32,64",
                          "--device", "cpu", "--out", str(tmp_path), "--in-process",
                          "--no-progress"])
    printed = capsys.readouterr().out
    assert "| 256 |" in printed and "Parallel (training)" in printed
    for name in ("streaming_cpu.csv", "parallel_cpu.csv", "streaming_cpu.png", "parallel_cpu.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "streaming_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    models = {r["model"] for r in rows}
    assert models == {"aaren", "transformer", "transformer_cat"}
    last = {r["model"]: r for r in rows if r["tokens"] == "256"}
    assert int(last["transformer"]["state_bytes"]) > 100 * int(last["aaren"]["state_bytes"])
    with open(tmp_path / "parallel_cpu.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert set(results["cpu"]["parallel"]["N"]) == {32, 64}


# --------------------------------------------------------------------------- quality


def test_datasets_ship_inside_the_package(example, no_network):
    import sktime.datasets
    data_dir = os.path.join(os.path.dirname(sktime.datasets.__file__), "data")
    for name in ("BasicMotions", "JapaneseVowels", "ItalyPowerDemand"):
        for split in ("TRAIN", "TEST"):
            assert os.path.isfile(os.path.join(data_dir, name, f"{name}_{split}.ts"))
    data = example.load_classification("JapaneseVowels")  # variable lengths
    assert len(data["X_train"]) == 270 and len(data["X_test"]) == 370
    assert len(data["classes"]) == 9
    assert {s.shape[1] for s in data["X_train"]} == {12}
    assert len({len(s) for s in data["X_train"]}) > 1
    for name in example.FORECASTING:
        series = example.load_series(name)
        assert len(series) > 100 and (series > 0).all()


def test_classification_quick(example, no_network):
    """A few epochs on BasicMotions: data loads, the loss falls, accuracy beats chance."""
    data = example.load_classification("BasicMotions")
    assert len(data["X_train"]) == 40 and len(data["X_test"]) == 40
    assert data["X_train"][0].shape == (100, 6)
    chance = 1 / len(data["classes"])
    assert chance == 0.25
    runs = {kind: example.train_classifier(kind, data, seed=0, epochs=15)
            for kind in example.MODELS}
    assert runs["aaren"]["params"] - runs["transformer"]["params"] < 2 * 64  # same size
    for kind, r in runs.items():
        losses = r["losses"]
        assert all(math.isfinite(x) for x in losses), kind
        assert sum(losses[-3:]) / 3 < 0.7 * losses[0], (kind, losses)
        assert r["test_accuracy"] >= chance + 0.25, (kind, r["test_accuracy"])
    table = example.classification_table(list(runs.values()))
    assert "BasicMotions" in table


def test_forecasting_quick(example, no_network):
    runs = [example.train_forecaster(kind, "Airline", seed=0, epochs=8) for kind in example.MODELS]
    for r in runs:
        assert math.isfinite(r["mse"]) and math.isfinite(r["mae"]) and r["mae"] > 0
        assert r["losses"][-1] < r["losses"][0]
    assert "seasonal naive" in example.forecasting_table(runs)
