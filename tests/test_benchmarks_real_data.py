"""Quick modes of the real-data benchmarks (docs/results.md has the full runs), end to end
on the standard files in ../shared/data with the network blocked:

- examples/forecast.py: every forecasting file loads (the ETT layout with dates and the
  headerless exchange_rate table) and gives the standard TSLib split sizes; a quick run on
  ETTh1 makes the loss fall for both models, writes finite metrics in the JSON record
  format and the PNG; a missing file is named with its source.
- examples/classify_uea.py: Handwriting (from the data folder) and JapaneseVowels (inside
  sktime) load with the standard UEA sizes; a quick run makes the training loss fall for
  both models and keeps the validation split out of training and the test set out of both.
"""
import json
import math
import os

import pytest
import torch

from example_scripts import ROOT, load_script

DATA = os.path.join(ROOT, "..", "shared", "data")
FORECASTING = os.path.join(DATA, "forecasting")

pytestmark = [
    pytest.mark.skipif(
        not os.path.isdir(DATA),
        reason="the benchmark data folder ../shared/data (relative to the project root) is absent"),
    pytest.mark.usefixtures("no_network", "one_thread"),
]

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
def uea():
    pytest.importorskip("sktime")
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    return load_script("examples/classify_uea.py", "classify_uea_example")


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


def test_forecast_missing_file_is_named(forecast, tmp_path):
    missing = tmp_path / "ETTm2.csv.gz"
    with pytest.raises(FileNotFoundError, match=r"ETTm2\.csv\.gz.*ETDataset"):
        forecast.main(["--data-path", str(missing), "--quick"])


def test_forecast_headerless_table_has_no_dates(forecast):
    values, names = forecast.read_table(os.path.join(FORECASTING, "exchange_rate.txt.gz"))
    assert values.shape == (7588, 8) and len(names) == 8


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


def test_classification_missing_file_is_named(uea, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Handwriting_TRAIN\.ts\.gz.*UEA"):
        uea.load_uea("Handwriting", str(tmp_path))
