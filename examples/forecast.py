"""Long-horizon multivariate forecasting under the Time-Series-Library (TSLib) protocol:
Aaren against a Transformer that differs from it only in the attention, and (`--models ...
no-attention`) against the ablation without attention.

Protocol (Informer / Autoformer / TSLib, as in the data folder's README):
- chronological splits: ETTh* files 12/4/4 months (8,640 / 2,880 / 2,880 hours), ETTm*
  files the same months at 4 points an hour, every other file 70/10/20 %; the validation and
  test windows start `seq_len` points before their split, so every test target is predicted;
- every channel standardized with the training split's mean and standard deviation;
- windows: `seq_len` = 96 input points of all channels -> the next `horizon` points of all
  channels (multivariate: "M" in TSLib), stride 1;
- metrics: MSE and MAE on the standardized scale over all test windows, steps and channels.

Model (both kinds; only the attention differs): per-window normalization of the input
(each window's channels minus their mean, over their standard deviation; the forecast is
de-normalized with the same statistics: the paper's "Transformer with normalized input",
RevIN without learned affine) -> Linear(channels, d_model) + sinusoidal positions ->
the causal stacks of `aaren.baselines.build_stacks` (pre-norm layers, final LayerNorm,
same parameter count) -> Linear(d_model, channels) at every input step -> Linear(seq_len,
horizon) along time, per channel. The head is this factorized linear rather than one
Linear(seq_len * d_model, horizon * channels) on the flattened outputs, which would hold
tens of millions of parameters at the long horizons and dominate CPU training time.

`--head` picks how the forecast is read from the stack's outputs:
- `time` (the default, above): every input step's output, mapped to the channels, then
  mixed along time by Linear(seq_len, horizon). This head mixes the window by itself, so a
  model without attention still sees all of it (a per-step MLP, then a linear map along
  time, close to DLinear), and the attention adds little to it.
- `last`: the last input step's output alone -> Linear(d_model, horizon * channels). The
  stacks are causal, so the last step is the only one that has seen the whole window, and
  everything the forecast knows of the earlier steps passed through the attention; without
  it, the forecast sees the last input point and the window's mean and standard deviation
  (the per-window normalization) only. This is the setting where the sequence mixing, and
  so the choice of attention, matters.

`--models` takes any of aaren, transformer and no-attention (default: the first two), one
record each. no-attention is the ablation: the Transformer's stack with every attention's
output replaced by zeros (`aaren.baselines.remove_attention`); the norms, feed-forward
blocks, embedding, positions and head are the Transformer's, initialized as those of the
Transformer of the same seed, and the parameters are the Transformer's less its attention's.

Recipe (TSLib's forecasting defaults): Adam, lr 1e-4, batch 32, at most 10 epochs, the lr
halved after every epoch from the second on (TSLib's "type1"), early stopping on the
validation MSE with patience 3, and the test metrics of the best-validation weights.
Defaults d_model 512, 8 heads, 2 layers, d_ff 2048, dropout 0.1; a smaller width on a CPU
must be stated with the results.

    python examples/forecast.py --data-path ../shared/data/forecasting/ETTh1.csv.gz \\
        --horizon 336 --seeds 0 1 2 --json etth1_336.json --plot etth1_336.png
    python examples/forecast.py --data-path ../shared/data/forecasting/ETTh1.csv.gz \\
        --models aaren transformer no-attention --head last --seeds 0 1 2 --json last.json
    python examples/forecast.py --quick      # a few hundred windows, one epoch, small width

FILE is any CSV in the ETT layout (a `date` column first, the target `OT` last; `.csv` or
`.csv.gz`) or a headerless numeric table without dates (`exchange_rate.txt.gz`); the
record's "dataset" is the file name without its extensions. The JSON output is a list of
records {"model", "dataset", "horizon", "seed", "mse", "mae", "params", "train_seconds",
...}, one per model and seed.
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The sequence model (embedding, positions, the two stacks) is the one of the
# small-scale comparison next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classify_timeseries import (MODEL_CHOICES, SequenceModel,  # noqa: E402
                                 add_training_arguments, parameter_count, training_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "..", "shared", "data")
DEFAULT_FILE = os.path.join(DATA_DIR, "forecasting", "ETTh1.csv.gz")
SEQ_LEN = 96
HORIZONS = (96, 192, 336, 720)
HEADS = ("time", "last")  # --head: see the module docstring

# Where the standard files come from, for the message when one is missing.
SOURCES = {
    "ETTh1": "ETDataset (github.com/zhouhaoyi/ETDataset), ETT-small/ETTh1.csv",
    "ETTh2": "ETDataset (github.com/zhouhaoyi/ETDataset), ETT-small/ETTh2.csv",
    "ETTm1": "ETDataset (github.com/zhouhaoyi/ETDataset), ETT-small/ETTm1.csv",
    "ETTm2": "ETDataset (github.com/zhouhaoyi/ETDataset), ETT-small/ETTm2.csv",
    "weather": "the Autoformer / Time-Series-Library data release, weather/weather.csv",
    "exchange_rate": "LSTNet (github.com/laiguokun/multivariate-time-series-data), "
                     "exchange_rate/exchange_rate.txt",
}


# --------------------------------------------------------------------------- data


def dataset_name(path: str) -> str:
    """File name without its extensions: ETTh1.csv.gz -> ETTh1."""
    name = os.path.basename(path)
    for ext in (".gz", ".csv", ".txt"):
        if name.endswith(ext):
            name = name[:-len(ext)]
    return name


def check_file(path: str, default: bool = False) -> None:
    """Raises FileNotFoundError naming the file (normalized); for one of the standard files
    (``SOURCES``), also where it comes from and where the project expects it, and for the
    `default` file (no --data-path given), how to name another. Any other file is only said
    to be missing."""
    if os.path.isfile(path):
        return
    shown = os.path.normpath(path)
    name = dataset_name(path)
    if name not in SOURCES:
        raise FileNotFoundError(f"forecasting data file not found: {shown}")
    raise FileNotFoundError(
        f"forecasting data file not found: {shown}{' (the default file)' if default else ''}. "
        f"{name} comes from {SOURCES[name]}; the project expects the standard files "
        f"(gzip-compressed) under ../shared/data/forecasting/ relative to its root "
        f"(../shared/data/README.md says where each comes from)"
        + (", or pass --data-path FILE." if default else "."))


def read_table(path: str) -> Tuple[np.ndarray, List[str]]:
    """The series [T, C] (float64) and the channel names, target last.

    ETT layout: a header row, a `date` column (dropped), the target `OT` (moved last if it
    is elsewhere, as TSLib does). A table whose first row is numeric has no header and no
    dates (exchange_rate.txt): every column is a channel, the last one the target."""
    import pandas as pd  # pandas reads .gz directly and sniffs the header row
    check_file(path)
    first = pd.read_csv(path, header=None, nrows=1, encoding_errors="replace")
    has_header = not all(isinstance(v, (int, float, np.number)) for v in first.iloc[0].tolist())
    frame = pd.read_csv(path, header=0 if has_header else None, encoding_errors="replace")
    if has_header:
        frame = frame.drop(columns=[c for c in frame.columns if str(c).lower() == "date"])
        if "OT" in frame.columns:
            frame = frame[[c for c in frame.columns if c != "OT"] + ["OT"]]
        names = [str(c) for c in frame.columns]
    else:
        names = [f"x{i}" for i in range(frame.shape[1])]
    values = frame.to_numpy(dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0 or not np.isfinite(values).all():
        raise ValueError(f"{path}: expected a numeric table without missing values, got "
                         f"shape {values.shape} with {int((~np.isfinite(values)).sum())} non-finite")
    return values, names


def split_borders(name: str, length: int, seq_len: int = SEQ_LEN) -> Dict[str, Tuple[int, int]]:
    """[start, end) rows of each split, the validation and test ones starting seq_len rows
    early (TSLib's Dataset_ETT_hour / Dataset_ETT_minute / Dataset_Custom)."""
    if name.startswith("ETTh") or name.startswith("ETTm"):
        per_month = 30 * 24 * (4 if name.startswith("ETTm") else 1)
        train_end, val_end, test_end = 12 * per_month, 16 * per_month, 20 * per_month
        if length < test_end:
            raise ValueError(f"{name}: {length} rows, fewer than the {test_end} of the ETT split")
    else:
        n_train, n_test = int(length * 0.7), int(length * 0.2)
        train_end, val_end, test_end = n_train, length - n_test, length
    return {"train": (0, train_end), "val": (train_end - seq_len, val_end),
            "test": (val_end - seq_len, test_end)}


class Windows:
    """The sliding windows of one split: inputs [seq_len, C] and targets [horizon, C]."""

    def __init__(self, series: Tensor, start: int, end: int, seq_len: int, horizon: int):
        self.data = series[start:end]
        self.seq_len, self.horizon = seq_len, horizon
        self.count = len(self.data) - seq_len - horizon + 1
        if self.count <= 0:
            raise ValueError(f"a split of {len(self.data)} rows has no window of "
                             f"{seq_len} + {horizon} points")
        self._past = torch.arange(seq_len)
        self._future = torch.arange(seq_len, seq_len + horizon)

    def __len__(self) -> int:
        return self.count

    def batch(self, idx: Tensor) -> Tuple[Tensor, Tensor]:
        starts = idx.unsqueeze(1)
        return self.data[starts + self._past], self.data[starts + self._future]


def load_splits(path: str, horizon: int, seq_len: int = SEQ_LEN) -> dict:
    values, names = read_table(path)
    name = dataset_name(path)
    borders = split_borders(name, len(values), seq_len)
    train = values[borders["train"][0]:borders["train"][1]]
    mean, std = train.mean(0), train.std(0)  # numpy's std: ddof 0, as sklearn's StandardScaler
    series = torch.tensor((values - mean) / np.where(std > 0, std, 1.0), dtype=torch.float32)
    splits = {split: Windows(series, a, b, seq_len, horizon) for split, (a, b) in borders.items()}
    return {"name": name, "channels": names, "rows": len(values), "splits": splits}


# --------------------------------------------------------------------------- the model


class Forecaster(nn.Module):
    """Per-window normalization -> SequenceModel (embedding, positions, the causal stack)
    -> the head -> de-normalization. x [B, seq_len, C] -> [B, horizon, C] (standardized
    units). Head "time": Linear(d_model, C) per step, then Linear(seq_len, horizon) along
    time; head "last": Linear(d_model, horizon * C) on the last step's output."""

    def __init__(self, kind: str, channels: int, seq_len: int, horizon: int, d_model: int,
                 nhead: int, num_layers: int, d_ff: int, dropout: float, head: str = "time"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}: expected one of {', '.join(HEADS)}")
        self.head_kind, self.horizon = head, horizon
        out_features = channels if head == "time" else horizon * channels
        self.body = SequenceModel(kind, channels, out_features, d_model, nhead, num_layers,
                                  dropout, seq_len, dim_feedforward=d_ff)
        self.time = nn.Linear(seq_len, horizon) if head == "time" else None

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5)
        z = (x - mean) / std
        if self.time is not None:
            h = self.body(z)                                     # [B, seq_len, C]
            y = self.time(h.transpose(1, 2)).transpose(1, 2)     # [B, horizon, C]
        else:
            h = self.body.features(z)[:, -1]                     # [B, d_model]: the last step
            y = self.body.head(h).view(x.size(0), self.horizon, x.size(2))
        return y * std + mean


@torch.no_grad()
def evaluate(model: nn.Module, windows: Windows, batch_size: int = 256,
             limit: Optional[Tensor] = None) -> Tuple[float, float]:
    """(MSE, MAE) over every window (or the windows `limit`), step and channel."""
    model.eval()
    idx_all = torch.arange(len(windows)) if limit is None else limit
    se = ae = 0.0
    count = 0
    for i in range(0, len(idx_all), batch_size):
        x, y = windows.batch(idx_all[i:i + batch_size])
        err = (model(x) - y).double()
        se += float((err ** 2).sum())
        ae += float(err.abs().sum())
        count += err.numel()
    model.train()
    return se / count, ae / count


def train_one(kind: str, data: dict, horizon: int, seed: int, args,
              subsets: dict) -> Tuple[dict, nn.Module]:
    """Trains one model with the recipe of the module docstring; returns its record and
    the model with its best-validation weights."""
    splits = data["splits"]
    channels = len(data["channels"])
    torch.manual_seed(seed)
    model = Forecaster(kind, channels, SEQ_LEN, horizon, args.d_model, args.n_heads,
                       args.e_layers, args.d_ff, args.dropout, head=args.head)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # TSLib's "type1": epoch e (from 0) runs at lr * 0.5 ** max(0, e - 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 ** max(0, e - 1))
    generator = torch.Generator().manual_seed(seed)
    train_idx = subsets["train"] if subsets["train"] is not None else torch.arange(len(splits["train"]))
    initial_val = evaluate(model, splits["val"], limit=subsets["val"])[0]
    best_val, best_state, bad_epochs = math.inf, None, 0
    train_losses, batch_losses, val_losses = [], [], []
    from tqdm import tqdm
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=generator)]
        total = 0.0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"{kind} seed {seed} epoch {epoch + 1}",
                   unit="batch", leave=False, file=sys.stderr, mininterval=10)
        for i in bar:
            x, y = splits["train"].batch(order[i:i + args.batch_size])
            loss = F.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch_losses.append(loss.item())
            total += loss.item() * len(x)
        train_losses.append(total / len(order))
        scheduler.step()
        val = evaluate(model, splits["val"], limit=subsets["val"])[0]
        val_losses.append(val)
        print(f"  {data['name']} H={horizon} {kind:12s} seed {seed} epoch {epoch + 1}: train "
              f"{train_losses[-1]:.4f} val {val:.4f} ({time.perf_counter() - start:.0f} s)",
              file=sys.stderr, flush=True)
        if val < best_val:
            best_val, best_state, bad_epochs = val, copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                break
    train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    mse, mae = evaluate(model, splits["test"], limit=subsets["test"])
    return {"model": kind, "dataset": data["name"], "horizon": horizon, "seed": seed,
            "mse": mse, "mae": mae, "params": parameter_count(model),
            "train_seconds": train_seconds, "epochs_run": len(train_losses),
            "best_epoch": 1 + val_losses.index(best_val), "train_losses": train_losses,
            "val_losses": val_losses, "initial_val_mse": initial_val,
            "first_batch_losses": batch_losses[:5], "last_batch_losses": batch_losses[-5:],
            "windows": {k: len(v) for k, v in splits.items()},
            "windows_used": {k: (len(splits[k]) if v is None else len(v)) for k, v in subsets.items()},
            "config": {"seq_len": SEQ_LEN, "head": args.head, **training_config(args)}}, model


def plot_window(models: Dict[str, nn.Module], data: dict, horizon: int, index: int,
                path: str) -> None:
    """A PNG of one test window: the input and true future of the target channel (last),
    and each model's forecast (up to three models)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x, y = data["splits"]["test"].batch(torch.tensor([index]))
    fig, ax = plt.subplots(figsize=(10, 4))
    past, future = np.arange(-SEQ_LEN, 0), np.arange(horizon)
    ax.plot(past, x[0, :, -1].numpy(), color="black", label="input")
    ax.plot(future, y[0, :, -1].numpy(), color="black", linestyle="--", label="truth")
    with torch.no_grad():
        for (kind, model), color in zip(models.items(), ("tab:red", "tab:blue", "tab:green")):
            model.eval()
            ax.plot(future, model(x)[0, :, -1].numpy(), color=color, label=f"{kind} forecast")
    ax.axvline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("step (0 = first forecast step)")
    ax.set_ylabel(f"{data['channels'][-1]} (standardized)")
    ax.set_title(f"{data['name']}, horizon {horizon}: test window {index} of "
                 f"{len(data['splits']['test'])}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_std(values: List[float], digits: int = 3) -> str:
    """The mean, and +- the sample standard deviation where there are two values or more (a
    single run has none; the table's n says how many there are)."""
    mean = f"{statistics.fmean(values):.{digits}f}"
    return f"{mean} +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def summary(records: List[dict]) -> str:
    """Markdown: per model, the mean +- sample std over seeds of the test MSE and MAE (the
    mean alone for one seed)."""
    lines = ["| dataset | horizon | head | model | MSE | MAE | params | train s (mean) | n |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for kind in MODEL_CHOICES:
        rs = [r for r in records if r["model"] == kind]
        if not rs:
            continue
        mse = [r["mse"] for r in rs]
        mae = [r["mae"] for r in rs]
        head = rs[0].get("config", {}).get("head", "time")
        lines.append(f"| {rs[0]['dataset']} | {rs[0]['horizon']} | {head} | {kind} | "
                     f"{mean_std(mse)} | {mean_std(mae)} | {rs[0]['params']:,} | "
                     f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} | {len(rs)} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", default=None,
                        help="the series (default ../shared/data/forecasting/ETTh1.csv.gz)")
    parser.add_argument("--horizon", type=int, default=96, help="forecast length (default 96)")
    add_training_arguments(parser, d_model=512, n_heads=8, e_layers=2, d_ff=2048, dropout=0.1,
                           lr=1e-4, batch_size=32, epochs=10, patience=3)
    parser.add_argument("--quick", action="store_true",
                        help="pipeline check, not the protocol: 320 training, 128 validation and "
                             "256 test windows (evenly spaced), one epoch, d_model 32, 4 heads, "
                             "d_ff 64, lr 1e-3")
    parser.add_argument("--head", default="time", choices=HEADS,
                        help="time (default): every step's output, then Linear(seq_len, horizon) "
                             "along time; last: the last step's output alone -> Linear(d_model, "
                             "horizon * channels), so that only the attention carries the earlier "
                             "steps to the forecast (see the module docstring)")
    parser.add_argument("--plot", default=None,
                        help="PNG of the middle test window's forecast (first seed, every model)")
    args = parser.parse_args(argv)
    if args.horizon <= 0:
        parser.error(f"--horizon must be positive, got {args.horizon}")
    if args.quick:
        args.epochs, args.d_model, args.n_heads, args.d_ff, args.lr = 1, 32, 4, 64, 1e-3
    torch.set_num_threads(args.threads)

    # a missing or unreadable series ends the script with its message (exit 2), not a
    # traceback; the functions themselves raise
    try:
        if args.data_path is None:
            args.data_path = DEFAULT_FILE
            check_file(args.data_path, default=True)
        data = load_splits(args.data_path, args.horizon)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    sizes = {k: len(v) for k, v in data["splits"].items()}
    print(f"{data['name']}: {data['rows']} rows x {len(data['channels'])} channels (target "
          f"{data['channels'][-1]}); windows of {SEQ_LEN} -> {args.horizon}: train {sizes['train']}, "
          f"val {sizes['val']}, test {sizes['test']}", flush=True)

    def spaced(n: int, k: int) -> Optional[Tensor]:
        return torch.linspace(0, n - 1, min(n, k)).round().long() if args.quick else None
    subsets = {"train": spaced(sizes["train"], 320), "val": spaced(sizes["val"], 128),
               "test": spaced(sizes["test"], 256)}

    records, first_models = [], {}
    for seed in args.seeds:
        for kind in args.models:
            record, model = train_one(kind, data, args.horizon, seed, args, subsets)
            records.append(record)
            if seed == args.seeds[0]:
                first_models[kind] = model
            print(f"{data['name']} H={args.horizon} {kind:12s} seed {seed}: test MSE "
                  f"{record['mse']:.4f} MAE {record['mae']:.4f}, {record['params']:,} params, "
                  f"{record['epochs_run']} epochs (best {record['best_epoch']}), "
                  f"{record['train_seconds']:.0f} s", flush=True)
            if args.json:  # after every run, so that an interrupted job keeps what it finished
                with open(args.json, "w") as f:
                    json.dump(records, f, indent=1)
    print()
    print(summary(records))
    if args.plot:
        plot_window(first_models, data, args.horizon, sizes["test"] // 2, args.plot)
    return records


if __name__ == "__main__":
    main()
