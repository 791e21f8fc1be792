"""Quick modes of the real-data benchmarks (docs/results.md has the full runs), end to end
on the standard files in ../shared/data with the network blocked:

- examples/forecast.py: every forecasting file loads (the ETT layout with dates and the
  headerless exchange_rate table) and gives the standard TSLib split sizes; a quick run on
  ETTh1 makes the loss fall for both models, writes finite metrics in the JSON record
  format and the PNG; a missing file is named with its source and the data folder's README
  (--data-path suggested only when none was given); the summary table shows a standard
  deviation only over two seeds or more.
- examples/classify_uea.py: Handwriting (from the data folder) and JapaneseVowels (inside
  sktime) load with the standard UEA sizes; a quick run makes the training loss fall for
  both models and keeps the validation split out of training and the test set out of both.
- the ablation (`--models ... no-attention`, every script): it is the Transformer of the
  same seed with its attention's output zeroed and nothing else changed, its tokens' features
  depend on no other token, an unknown model name is refused with the choices; smoke runs of
  `forecast.py --head last` and `classify_uea.py --pool last` with the three models. These
  checks of the model need no data file and run without ../shared/data.
"""
import json
import math
import os
import re

import pytest
import torch

from example_scripts import ROOT, load_script

DATA = os.path.join(ROOT, "..", "shared", "data")
FORECASTING = os.path.join(DATA, "forecasting")

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")
needs_data = pytest.mark.skipif(
    not os.path.isdir(DATA),
    reason="the benchmark data folder ../shared/data (relative to the project root) is absent")

# TSLib's window counts (train / val / test) at seq_len 96, horizon 96: the numbers its
# data loaders print for these files.
STANDARD_WINDOWS = {
    "ETTh1.csv.gz": (8449, 2785, 2785),
    "ETTm1.csv.gz": (34369, 11425, 11425),
    "weather.csv.gz": (36696, 5175, 10444),
    "exchange_rate.txt.gz": (5120, 665, 1422),
}
REQUIRED_KEYS = {"model", "dataset", "horizon", "seed", "mse", "mae", "params", "train_seconds"}


@pytest.fixture(scope="module")
def forecast():
    pytest.importorskip("pandas")
    pytest.importorskip("tqdm")
    return load_script("examples/forecast.py", "forecast_example")


@pytest.fixture(scope="module")
def timeseries():
    return load_script("examples/classify_timeseries.py", "classify_timeseries")


@pytest.fixture(scope="module")
def uea():
    pytest.importorskip("sktime")
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    return load_script("examples/classify_uea.py", "classify_uea_example")


@needs_data
@pytest.mark.parametrize("file", sorted(STANDARD_WINDOWS))
def test_forecasting_files_give_standard_splits(forecast, file):
    data = forecast.load_splits(os.path.join(FORECASTING, file), horizon=96)
    sizes = tuple(len(data["splits"][k]) for k in ("train", "val", "test"))
    assert sizes == STANDARD_WINDOWS[file]
    assert data["name"] == file.split(".")[0]
    if file != "exchange_rate.txt.gz":
        assert data["channels"][-1] == "OT"
    # train-split standardization: the training rows have mean 0 and std 1 per channel
    train = data["splits"]["train"].data
    assert torch.allclose(train.double().mean(0), torch.zeros(train.size(1), dtype=torch.float64),
                          atol=1e-4)
    assert torch.allclose(train.double().std(0, unbiased=False),
                          torch.ones(train.size(1), dtype=torch.float64), atol=1e-4)
    # the test windows end at the last row: every test target is predicted
    test = data["splits"]["test"]
    _, last_target = test.batch(torch.tensor([len(test) - 1]))
    series_end = test.data[-96:]
    assert torch.equal(last_target[0], series_end)


@needs_data
def test_forecast_quick_end_to_end(forecast, tmp_path):
    out, png = tmp_path / "records.json", tmp_path / "window.png"
    records = forecast.main(["--data-path", os.path.join(FORECASTING, "ETTh1.csv.gz"),
                             "--horizon", "96", "--quick", "--json", str(out), "--plot", str(png)])
    on_disk = json.loads(out.read_text())
    assert [r["model"] for r in on_disk] == ["aaren", "transformer"]
    assert png.stat().st_size > 10_000
    for r in on_disk:
        assert REQUIRED_KEYS <= set(r)
        assert (r["dataset"], r["horizon"], r["seed"]) == ("ETTh1", 96, 0)
        assert r["windows"] == dict(zip(("train", "val", "test"), STANDARD_WINDOWS["ETTh1.csv.gz"]))
        assert r["windows_used"] == {"train": 320, "val": 128, "test": 256}
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("mse", "mae", "train_seconds"))
        assert r["mae"] <= math.sqrt(r["mse"]) + 1e-9  # MAE <= RMSE
        # the loss falls: the last batches' below the first ones', and the validation MSE
        # after the epoch below the untrained model's
        assert sum(r["last_batch_losses"]) < sum(r["first_batch_losses"])
        assert r["val_losses"][-1] < r["initial_val_mse"]
    # the two models differ only in the attention: parameter counts within d_model per layer
    params = [r["params"] for r in records]
    assert abs(params[0] - params[1]) <= 32 * 2


def test_forecast_missing_file_is_named(forecast, tmp_path, monkeypatch, capsys):
    """The message names the file (normalized); for a standard file also its source and the
    data folder's README, suggesting --data-path only when none was given (the default file
    is missing); for any other file only that it is missing. The script exits with it
    (status 2, argparse's), the function raises FileNotFoundError."""
    missing = tmp_path / "ETTm2.csv.gz"
    with pytest.raises(FileNotFoundError, match=r"ETTm2\.csv\.gz.*ETDataset") as given:
        forecast.check_file(str(missing))
    assert "README.md" in str(given.value) and "--data-path" not in str(given.value)
    with pytest.raises(SystemExit) as exit_info:
        forecast.main(["--data-path", str(missing), "--quick"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"ETTm2\.csv\.gz.*ETDataset", err) and "Traceback" not in err
    monkeypatch.setattr(forecast, "DEFAULT_FILE", str(tmp_path / "ETTh1.csv.gz"))
    with pytest.raises(SystemExit):
        forecast.main(["--quick"])
    err = capsys.readouterr().err
    assert re.search(r"ETTh1\.csv\.gz \(the default file\).*ETDataset", err)
    assert "README.md" in err and "or pass --data-path FILE" in err
    # a file of the user's own: only that it is missing, its path normalized
    with pytest.raises(SystemExit):
        forecast.main(["--data-path", str(tmp_path / "sub" / ".." / "mine.csv"), "--quick"])
    err = capsys.readouterr().err
    assert f"forecasting data file not found: {tmp_path / 'mine.csv'}\n" in err
    assert "shared" not in err and "data release" not in err


def test_forecast_summary_std_only_with_two_seeds(forecast):
    """One seed: the means alone (no "+- 0.000"); two seeds: mean +- sample std."""
    def record(model, seed, mse):
        return {"model": model, "dataset": "ETTh1", "horizon": 96, "seed": seed, "mse": mse,
                "mae": 0.5, "params": 1000, "train_seconds": 10.0}
    table = forecast.summary([record("aaren", 0, 0.25), record("transformer", 0, 0.25),
                              record("transformer", 1, 0.75)])
    aaren_row, transformer_row = table.splitlines()[2:]
    assert aaren_row == "| ETTh1 | 96 | time | aaren | 0.250 | 0.500 | 1,000 | 10 | 1 |"
    assert transformer_row == ("| ETTh1 | 96 | time | transformer | 0.500 +- 0.354 | "
                               "0.500 +- 0.000 | 1,000 | 10 | 2 |")


@needs_data
def test_forecast_headerless_table_has_no_dates(forecast):
    values, names = forecast.read_table(os.path.join(FORECASTING, "exchange_rate.txt.gz"))
    assert values.shape == (7588, 8) and len(names) == 8


@needs_data
def test_classification_quick_end_to_end(uea, tmp_path):
    out = tmp_path / "uea.json"
    records = uea.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    assert [(r["dataset"], r["model"]) for r in records] == [
        ("Handwriting", "aaren"), ("Handwriting", "transformer"),
        ("JapaneseVowels", "aaren"), ("JapaneseVowels", "transformer")]
    for r in records:
        train, test = uea.SIZES[r["dataset"]]
        # the validation split is carved from the training cases, the test set is untouched
        assert r["cases"]["fit"] + r["cases"]["val"] == train
        assert r["cases"]["test"] == test
        assert r["cases"]["val"] == math.ceil(0.2 * train)
        assert r["train_losses"][-1] < r["train_losses"][0]
        assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"])


def test_classification_missing_file_is_named(uea, tmp_path, monkeypatch, capsys):
    """A missing Handwriting file: the script exits with status 2 and a message naming the
    file (normalized) and its source, suggesting --data-dir only when none was given; no
    traceback. The function raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match=r"Handwriting_TRAIN\.ts\.gz.*UEA multivariate"):
        uea.load_uea("Handwriting", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        uea.main(["--data-dir", str(tmp_path / "sub" / ".."), "--datasets", "Handwriting", "--quick"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = tmp_path / "classification" / "Handwriting" / "Handwriting_TRAIN.ts.gz"
    assert f"UEA data file not found: {expected}." in err
    assert "--data-dir." not in err and "Traceback" not in err
    monkeypatch.setattr(uea, "DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        uea.main(["--datasets", "Handwriting", "--quick"])
    assert "or pass --data-dir." in capsys.readouterr().err


# --------------------------------------------------------------------------- the ablation


def _forecasters(forecast, head, seed=0, **sizes):
    """The three kinds of Forecaster built from the same seed, in eval mode."""
    sizes = {"channels": 3, "seq_len": 24, "horizon": 8, "d_model": 32, "nhead": 4,
             "num_layers": 2, "d_ff": 64, "dropout": 0.1, **sizes}
    models = {}
    for kind in ("aaren", "transformer", "no-attention"):
        torch.manual_seed(seed)
        models[kind] = forecast.Forecaster(kind, head=head, **sizes).eval()
    return models


@pytest.mark.parametrize("head", ["time", "last"])
def test_no_attention_is_the_transformer_with_zero_attention(forecast, head):
    """The ablation is the Transformer of the same seed with every attention's output made
    zero (its output projection zeroed), and nothing else: same parameters otherwise, same
    outputs; only the attention's 4 E^2 + 4 E parameters per layer are gone."""
    models = _forecasters(forecast, head)
    transformer, ablation = models["transformer"], models["no-attention"]
    kept = ablation.state_dict()
    full = transformer.state_dict()
    assert set(kept) == {k for k in full if ".self_attn." not in k}
    assert all(torch.equal(kept[k], full[k]) for k in kept)
    E, layers = 32, 2
    assert (forecast.parameter_count(transformer) - forecast.parameter_count(ablation)
            == layers * (4 * E * E + 4 * E))
    x = torch.randn(5, 24, 3)
    with torch.no_grad():
        assert not torch.allclose(transformer(x), ablation(x))  # the attention did something
        for layer in transformer.body.encoder.layers:
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
        assert torch.equal(transformer(x), ablation(x))


def test_no_attention_outputs_zeros_and_mixes_no_tokens(forecast):
    """Every layer's attention returns zeros of its input's shape (in training mode too, and
    when streaming); so each token's features depend on that token alone, where both
    attentions carry the earlier tokens into the later ones."""
    from aaren.baselines import ZeroAttention
    torch.manual_seed(0)
    model = forecast.SequenceModel("no-attention", 3, 2, d_model=32, nhead=4, num_layers=2,
                                   max_len=24, dim_feedforward=64)
    seen = []
    for layer in model.encoder.layers:
        assert isinstance(layer.self_attn, ZeroAttention)
        assert not list(layer.self_attn.parameters())
        layer.self_attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    model.train()
    model.features(torch.randn(4, 24, 3))
    assert len(seen) == 2
    for inputs, out in seen:
        assert out.shape == inputs.shape and not out.any()
    h, _ = model.encoder.step(torch.randn(4, 32))
    assert h.shape == (4, 32)

    x = torch.randn(4, 24, 3)
    changed = x.clone()
    changed[:, :-1] = torch.randn(4, 23, 3)  # every token but the last one
    for kind in ("aaren", "transformer", "no-attention"):
        torch.manual_seed(0)
        m = forecast.SequenceModel(kind, 3, 2, d_model=32, nhead=4, num_layers=2, max_len=24,
                                   dim_feedforward=64).eval()
        with torch.no_grad():
            same_last = torch.allclose(m.features(x)[:, -1], m.features(changed)[:, -1])
        assert same_last == (kind == "no-attention"), kind


def test_head_last_reads_the_last_step_only(forecast):
    """--head last: the forecast is a linear map of the last step's output; without attention,
    a window whose earlier steps change (the last point, the window's mean and standard
    deviation kept) gets the same forecast, with either attention a different one."""
    models = _forecasters(forecast, "last")
    assert models["aaren"].time is None
    x = torch.randn(5, 24, 3)
    # another window with the same last point, mean and (population) standard deviation:
    # permute the earlier points in time
    y = x.clone()
    y[:, :-1] = x[:, torch.randperm(23)]
    assert torch.allclose(x.mean(1), y.mean(1), atol=1e-6)
    with torch.no_grad():
        for kind, model in models.items():
            out = model(x)
            assert out.shape == (5, 8, 3)
            assert torch.allclose(out, model(y), atol=1e-5) == (kind == "no-attention"), kind


def test_unknown_model_names_are_refused(forecast, uea, timeseries, capsys):
    for script in (forecast, uea, timeseries):
        with pytest.raises(SystemExit):
            script.main(["--models", "aaren", "no-attn", "--quick"])
        err = capsys.readouterr().err
        assert "invalid choice: 'no-attn'" in err and "no-attention" in err
    with pytest.raises(ValueError, match=r"unknown model 'lstm'.*no-attention"):
        timeseries.SequenceModel("lstm", 3, 2)
    with pytest.raises(ValueError, match=r"unknown head 'first'"):
        forecast.Forecaster("aaren", 3, 24, 8, 32, 4, 2, 64, 0.1, head="first")


def test_pool_last_reads_each_cases_last_valid_step(timeseries):
    torch.manual_seed(0)
    model = timeseries.SequenceModel("transformer", 3, 4, d_model=32, nhead=4, num_layers=2,
                                     max_len=10, pool="last").eval()
    x, lengths = torch.randn(3, 10, 3), torch.tensor([10, 4, 7])
    with torch.no_grad():
        h = model.features(x)
        expected = model.head(torch.stack([h[i, n - 1] for i, n in enumerate(lengths.tolist())]))
        torch.testing.assert_close(model.classify(x, lengths), expected)


@needs_data
def test_forecast_head_last_smoke(forecast, tmp_path):
    """A seconds-long run of the new setting with the three models: one record each, in the
    order given, the head in the record's config, finite metrics, the ablation's parameters
    the Transformer's less its attention's; both attentions' validation MSE falls."""
    out = tmp_path / "last.json"
    records = forecast.main(["--data-path", os.path.join(FORECASTING, "ETTh1.csv.gz"),
                             "--quick", "--head", "last",
                             "--models", "aaren", "transformer", "no-attention", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    assert [r["model"] for r in records] == ["aaren", "transformer", "no-attention"]
    for r in records:
        assert REQUIRED_KEYS <= set(r) and r["config"]["head"] == "last"
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("mse", "mae"))
    params = {r["model"]: r["params"] for r in records}
    assert params["transformer"] - params["no-attention"] == 2 * (4 * 32 * 32 + 4 * 32)
    for r in records[:2]:
        assert r["val_losses"][-1] < r["initial_val_mse"], r["model"]


@needs_data
def test_classification_pool_last_smoke(uea):
    records = uea.main(["--quick", "--datasets", "JapaneseVowels", "--pool", "last",
                        "--models", "no-attention", "aaren"])
    assert [r["model"] for r in records] == ["no-attention", "aaren"]
    for r in records:
        assert r["config"]["pool"] == "last"
        assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["test_loss"])
    assert records[0]["params"] < records[1]["params"]


def test_sktime_script_takes_the_ablation(timeseries):
    pytest.importorskip("sktime")
    pytest.importorskip("tqdm")
    result = timeseries.main(["--datasets", "BasicMotions", "--seeds", "1", "--epochs", "2",
                              "--no-forecast", "--models", "transformer", "no-attention"])
    assert [r["model"] for r in result["classification"]] == ["transformer", "no-attention"]
    table = timeseries.classification_table(result["classification"])
    assert "no attention test accuracy" in table.splitlines()[0]

