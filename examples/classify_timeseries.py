"""Quality: Aaren vs a Transformer of the same size on real time series.

Classification on datasets of the UEA/UCR archives and forecasting on classic series, all
shipped inside the sktime package (read from its site-packages folder: nothing is
downloaded). Both models are the same sequence model around the two stacks of
aaren.baselines (`build_stacks`: same width, depth, heads, layer structure
and, to within 0.1%, parameter count); only the attention differs: `aaren.AarenEncoder`
(one learned query per head, a parallel scan) or causal softmax attention with
`scaled_dot_product_attention(is_causal=True)`. Both are causal. `--models ... no-attention`
adds the ablation: the Transformer's stack with every attention's output replaced by zeros
(`aaren.baselines.remove_attention`: the same norms, feed-forward blocks, embedding and head,
initialized as the Transformer's of the same seed), so that each token's features depend on
that token alone; it tells how much of a result the attention (either kind) accounts for.

Model: per-channel standardized input -> Linear(channels, E) + sinusoidal positions ->
dropout -> stack (2 pre-norm layers, 4 heads, E = 64, GELU feed-forward, final LayerNorm) ->
classification: mean of the outputs over the valid (unpadded) tokens -> Linear(E, classes);
forecasting: Linear(E, 1) at every token, predicting the next value.
Variable-length series (JapaneseVowels) are right-padded with zeros: since both models are
causal, padding after a sequence cannot change its valid outputs, and the pooling skips it.

Recipe, the same for both: AdamW (lr 1e-3, weight decay 0.01), batch 16, linear warm-up
over the first 5% of steps then cosine decay, gradient clipping at 1, dropout 0.1, a fixed
number of epochs per dataset; test accuracy of the final model (no early stopping, no
model selection on the test set). Seeds 0..S-1 (initialization and batch order).

    python examples/classify_timeseries.py                # full run (docs/results.md)
    python examples/classify_timeseries.py --quick        # a few epochs, one dataset, one seed
    python examples/classify_timeseries.py --datasets BasicMotions --seeds 3 --no-forecast
    python examples/classify_timeseries.py --models aaren transformer no-attention
"""
import argparse
import json
import math
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aaren.baselines import build_stacks, remove_attention  # the stacks of the streaming benchmark

# The two attentions compared (every script's default --models), and the ablation that
# --models also accepts: the Transformer's stack whose attention outputs zeros.
MODELS = ("aaren", "transformer")
ABLATION = "no-attention"
MODEL_CHOICES = MODELS + (ABLATION,)
LABELS = {"aaren": "Aaren", "transformer": "Transformer", ABLATION: "no attention"}

# The training options of the TSLib-protocol scripts (forecast.py, classify_uea.py), each
# protocol with its own defaults: name -> type.
TRAINING_OPTIONS = {"d_model": int, "n_heads": int, "e_layers": int, "d_ff": int,
                    "dropout": float, "lr": float, "batch_size": int, "epochs": int,
                    "patience": int}


def add_training_arguments(parser, **defaults) -> None:
    """--seeds, --models, one --option per TRAINING_OPTIONS entry (defaults: the protocol's,
    every one given), --threads and --json, on an argparse parser."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_models_argument(parser)
    for name, kind in TRAINING_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults.pop(name))
    if defaults:
        raise TypeError(f"add_training_arguments: unknown options {sorted(defaults)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", default=None, help="write the records (a JSON list) here")


def add_models_argument(parser) -> None:
    """--models: any of MODEL_CHOICES, in the order given (default: the two attentions);
    argparse refuses an unknown name, listing the choices."""
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODEL_CHOICES),
                        metavar="MODEL",
                        help=f"any of {', '.join(MODEL_CHOICES)} (default: {' '.join(MODELS)}); "
                             f"{ABLATION} is the ablation: the transformer's stack with every "
                             f"attention's output replaced by zeros")


def training_config(args) -> dict:
    """The TRAINING_OPTIONS of parsed arguments, and --quick: a record's "config"."""
    return {**{name: getattr(args, name) for name in TRAINING_OPTIONS}, "quick": args.quick}


# name: (sktime loader, epochs in the full run)
CLASSIFICATION = {
    "BasicMotions": ("load_basic_motions", 100),        # 6 channels, length 100, 4 classes, 40/40
    "JapaneseVowels": ("load_japanese_vowels", 50),     # 12 channels, length 7..29, 9 classes, 270/370
    "ItalyPowerDemand": ("load_italy_power_demand", 150),  # 1 channel, length 24, 2 classes, 67/1029
}
# name: (sktime loader, held-out horizon, season for the seasonal naive baseline)
FORECASTING = {
    "Airline": ("load_airline", 24, 12),   # monthly passengers 1949-1960, 144 points
    "Lynx": ("load_lynx", 20, None),       # annual lynx trappings 1821-1934, 114 points
}


# --------------------------------------------------------------------------- data


def _sktime_loader(name: str):
    import sktime.datasets
    return getattr(sktime.datasets, name)


def load_classification(name: str) -> dict:
    """A dataset's train and test splits as lists of float32 arrays [T_i, C] and int labels.

    The series come from the .ts files inside the installed sktime package."""
    loader = _sktime_loader(CLASSIFICATION[name][0])
    return as_dataset(name, {split: loader(split=split, return_X_y=True)
                             for split in ("train", "test")})


def as_dataset(name: str, nested: dict) -> dict:
    """{"train": (X, y), "test": (X, y)} with X sktime's nested DataFrame (one pd.Series a
    cell) -> the dict of load_classification (labels indexed over the sorted class names)."""
    splits = {}
    for split, (X, y) in nested.items():
        seqs = [np.stack([np.asarray(X.iloc[i, c], dtype=np.float32) for c in range(X.shape[1])],
                         axis=-1) for i in range(len(X))]
        splits[split] = (seqs, np.asarray(y).astype(str))
    classes = sorted(set(splits["train"][1]) | set(splits["test"][1]))
    index = {c: i for i, c in enumerate(classes)}
    data = {"name": name, "classes": classes}
    for split, (seqs, labels) in splits.items():
        data[f"X_{split}"] = seqs
        data[f"y_{split}"] = np.array([index[c] for c in labels], dtype=np.int64)
    return data


def pad(seqs: List[np.ndarray], mean: np.ndarray, std: np.ndarray) -> Tuple[Tensor, Tensor]:
    """Standardized, right-padded batch [n, T_max, C] and the lengths [n]."""
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.zeros(len(seqs), int(lengths.max()), seqs[0].shape[1])
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.from_numpy((s - mean) / std)
    return torch.nan_to_num(x), lengths


def load_series(name: str) -> np.ndarray:
    return np.asarray(_sktime_loader(FORECASTING[name][0])(), dtype=np.float64)


# --------------------------------------------------------------------------- the model


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


POOLS = ("mean", "last")


class SequenceModel(nn.Module):
    """Input projection + positions -> Aaren, Transformer or no-attention stack -> a linear
    head. `pool` is what `classify` reads: "mean", the mean of the outputs over the valid
    tokens, or "last", the output at each sequence's last valid token (the only one that has
    seen the whole sequence; without attention it has seen that token alone)."""

    def __init__(self, kind: str, in_features: int, out_features: int, d_model: int = 64,
                 nhead: int = 4, num_layers: int = 2, dropout: float = 0.1, max_len: int = 1024,
                 dim_feedforward: Optional[int] = None, pool: str = "mean"):
        super().__init__()
        if kind not in MODEL_CHOICES:
            raise ValueError(f"unknown model {kind!r}: expected one of {', '.join(MODEL_CHOICES)}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}: expected one of {', '.join(POOLS)}")
        # Both stacks are always built, so that a seed gives every kind the same draws: the
        # ablation is the Transformer of the same seed without its attention.
        aaren_stack, transformer, info = build_stacks(d_model, nhead, num_layers, dim_feedforward,
                                                      dropout=dropout)
        if kind == "aaren":
            self.encoder = aaren_stack
        elif kind == "transformer":
            self.encoder = transformer
        else:
            self.encoder = remove_attention(transformer)
        self.kind, self.pool = kind, pool
        self.embed = nn.Linear(in_features, d_model)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, out_features)

    def features(self, x: Tensor) -> Tensor:
        """x [B, T, C] -> [B, T, E] (causal: token t sees tokens 1..t)."""
        return self.encoder(self.drop(self.embed(x) + self.positions[:x.size(1)]))

    def classify(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Logits [B, classes] from each sequence's valid tokens: their mean (pool "mean") or
        the last one (pool "last")."""
        h = self.features(x)
        if self.pool == "last":
            return self.head(h[torch.arange(h.size(0), device=h.device), lengths - 1])
        valid = (torch.arange(x.size(1), device=x.device) < lengths.unsqueeze(1)).unsqueeze(-1)
        pooled = (h * valid).sum(1) / lengths.unsqueeze(1).to(h.dtype)
        return self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Per-token outputs [B, T, out_features]."""
        return self.head(self.features(x))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _schedule(optimizer, total_steps: int):
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(model: nn.Module, batch_loss, n: int, epochs: int, batch_size: int, lr: float,
        weight_decay: float, seed: int) -> List[float]:
    """The one training recipe of both models and both tasks: AdamW, the warm-up/cosine
    schedule, gradient clipping, shuffled minibatches of indices into n examples.
    Returns the mean training loss of each epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = _schedule(optimizer, epochs * math.ceil(n / batch_size))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        losses.append(total / n)
    return losses


# --------------------------------------------------------------------------- classification

def train_classifier(kind: str, data: dict, seed: int, epochs: int, batch_size: int = 16,
                     lr: float = 1e-3, weight_decay: float = 0.01, d_model: int = 64,
                     nhead: int = 4, num_layers: int = 2, dropout: float = 0.1) -> dict:
    """Trains one model on data's train split; returns the test accuracy, the mean training
    loss of each epoch, the parameter count and the seconds taken."""
    start = time.perf_counter()
    channels = data["X_train"][0].shape[1]
    stacked = np.concatenate(data["X_train"], axis=0)
    mean, std = np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0) + 1e-6
    x_train, len_train = pad(data["X_train"], mean, std)
    x_test, len_test = pad(data["X_test"], mean, std)
    y_train, y_test = torch.from_numpy(data["y_train"]), torch.from_numpy(data["y_test"])
    max_len = max(x_train.size(1), x_test.size(1))

    torch.manual_seed(seed)
    model = SequenceModel(kind, channels, len(data["classes"]), d_model, nhead, num_layers,
                          dropout, max_len)
    def batch_loss(idx: Tensor) -> Tensor:
        lengths = len_train[idx]
        x = x_train[idx, :int(lengths.max())]
        return F.cross_entropy(model.classify(x, lengths), y_train[idx])

    losses = fit(model, batch_loss, len(y_train), epochs, batch_size, lr, weight_decay, seed)
    accuracy = evaluate(model, x_test, len_test, y_test)
    return {"model": kind, "dataset": data["name"], "seed": seed, "epochs": epochs,
            "test_accuracy": accuracy, "train_accuracy": evaluate(model, x_train, len_train, y_train),
            "losses": losses, "params": parameter_count(model),
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: SequenceModel, x: Tensor, lengths: Tensor, y: Tensor,
             batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        lens = lengths[i:i + batch_size]
        logits = model.classify(x[i:i + batch_size, :int(lens.max())], lens)
        correct += int((logits.argmax(-1) == y[i:i + batch_size]).sum())
    model.train()
    return correct / len(y)


# --------------------------------------------------------------------------- forecasting


def train_forecaster(kind: str, name: str, seed: int, epochs: int = 100, context: int = 36,
                     batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 0.01,
                     d_model: int = 64, nhead: int = 4, num_layers: int = 2,
                     dropout: float = 0.1) -> dict:
    """One-step-ahead forecasts of the last `horizon` points of a series.

    The series is log-transformed and standardized with the training part's statistics.
    Training: every window of `context` + 1 consecutive training points; the model reads
    `context` values and predicts the next value after each (all positions in the loss).
    Test: for each held-out point, the `context` true values before it; the forecast is
    the output at the last token, transformed back. Returns MSE and MAE in the series'
    units."""
    start = time.perf_counter()
    horizon = FORECASTING[name][1]
    series = load_series(name)
    logs = np.log(series)
    train = logs[:-horizon]
    mu, sd = train.mean(), train.std()
    z = torch.tensor((logs - mu) / sd, dtype=torch.float32)
    n_train = len(train)
    windows = torch.stack([z[i:i + context + 1] for i in range(n_train - context)])  # [W, ctx+1]
    inputs, targets = windows[:, :-1, None], windows[:, 1:, None]

    torch.manual_seed(seed)
    model = SequenceModel(kind, 1, 1, d_model, nhead, num_layers, dropout, context)
    losses = fit(model, lambda idx: F.mse_loss(model(inputs[idx]), targets[idx]), len(windows),
                 epochs, batch_size, lr, weight_decay, seed)
    model.eval()
    test_idx = range(len(series) - horizon, len(series))
    with torch.no_grad():
        x = torch.stack([z[j - context:j] for j in test_idx])[:, :, None]
        pred_z = model(x)[:, -1, 0].double().numpy()
    pred = np.exp(pred_z * sd + mu)
    actual = series[-horizon:]
    return {"model": kind, "dataset": name, "seed": seed, "epochs": epochs,
            "mse": float(np.mean((pred - actual) ** 2)), "mae": float(np.mean(np.abs(pred - actual))),
            "losses": losses, "params": parameter_count(model),
            "seconds": time.perf_counter() - start}


def naive_forecasts(name: str) -> Dict[str, Dict[str, float]]:
    """One-step-ahead baselines on the same held-out points: the last value, and the value
    one season earlier where the series has a season."""
    _, horizon, season = FORECASTING[name]
    series = load_series(name)
    actual = series[-horizon:]
    out = {}
    for label, lag in (("naive (last value)", 1), (f"seasonal naive (m={season})", season)):
        if lag is None:
            continue
        pred = series[len(series) - horizon - lag:len(series) - lag]
        out[label] = {"mse": float(np.mean((pred - actual) ** 2)),
                      "mae": float(np.mean(np.abs(pred - actual)))}
    return out


# --------------------------------------------------------------------------- reporting


def _mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def classification_table(runs: List[dict]) -> str:
    """One row per dataset, a test-accuracy column per model present in `runs`."""
    kinds = [k for k in MODEL_CHOICES if any(r["model"] == k for r in runs)]
    labels = [LABELS[k] for k in kinds]
    lines = ["| dataset | " + " | ".join(f"{label} test accuracy" for label in labels)
             + f" | params ({' / '.join(labels)}) |",
             "|---|" + "---:|" * (len(kinds) + 1)]
    for name in dict.fromkeys(r["dataset"] for r in runs):
        cells, params = [], []
        for kind in kinds:
            rs = [r for r in runs if r["dataset"] == name and r["model"] == kind]
            if not rs:
                cells.append("-")
                params.append("-")
                continue
            mean, std = _mean_std([r["test_accuracy"] for r in rs])
            cells.append(f"{100 * mean:.1f} +- {100 * std:.1f} % (n={len(rs)})")
            params.append(f"{rs[0]['params']:,}")
        lines.append(f"| {name} | {' | '.join(cells)} | {' / '.join(params)} |")
    return "\n".join(lines)


def forecasting_table(runs: List[dict]) -> str:
    lines = ["| series (held-out points) | model | MSE | MAE |", "|---|---|---:|---:|"]
    for name in dict.fromkeys(r["dataset"] for r in runs):
        horizon = FORECASTING[name][1]
        for kind in MODEL_CHOICES:
            rs = [r for r in runs if r["dataset"] == name and r["model"] == kind]
            if not rs:
                continue
            label = LABELS[kind]
            mse, mse_sd = _mean_std([r["mse"] for r in rs])
            mae, mae_sd = _mean_std([r["mae"] for r in rs])
            lines.append(f"| {name} (last {horizon}) | {label} (n={len(rs)}) | "
                         f"{mse:,.1f} +- {mse_sd:,.1f} | {mae:,.2f} +- {mae_sd:,.2f} |")
        for label, m in naive_forecasts(name).items():
            lines.append(f"| {name} (last {horizon}) | {label} | {m['mse']:,.1f} | {m['mae']:,.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(CLASSIFICATION),
                        choices=list(CLASSIFICATION))
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..S-1 (default 5)")
    add_models_argument(parser)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs for every dataset (default: per dataset, see CLASSIFICATION)")
    parser.add_argument("--forecast", nargs="*", default=list(FORECASTING),
                        choices=list(FORECASTING), help="series to forecast (default all)")
    parser.add_argument("--no-forecast", action="store_true")
    parser.add_argument("--forecast-epochs", type=int, default=100)
    parser.add_argument("--quick", action="store_true",
                        help="BasicMotions, one seed, 20 epochs, no forecasting")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the models are small)")
    parser.add_argument("--json", default=None, help="also write every run's results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds, args.epochs, args.no_forecast = ["BasicMotions"], 1, 20, True
    torch.set_num_threads(args.threads)

    from tqdm import tqdm
    jobs = [(name, kind, seed) for name in args.datasets for seed in range(args.seeds)
            for kind in args.models]
    runs = []
    started = time.perf_counter()
    data = {name: load_classification(name) for name in args.datasets}
    for name, d in data.items():
        lengths = [len(s) for s in d["X_train"] + d["X_test"]]
        print(f"{name}: {len(d['X_train'])} train / {len(d['X_test'])} test series, "
              f"{d['X_train'][0].shape[1]} channels, length {min(lengths)}..{max(lengths)}, "
              f"{len(d['classes'])} classes", flush=True)
    bar = tqdm(jobs, desc="classification", unit="run", file=sys.stderr)
    for name, kind, seed in bar:
        bar.set_postfix_str(f"{name} {kind} seed {seed}")
        epochs = args.epochs or CLASSIFICATION[name][1]
        runs.append(train_classifier(kind, data[name], seed, epochs))
        r = runs[-1]
        tqdm.write(f"  {name:16s} {kind:11s} seed {seed}: test acc {100 * r['test_accuracy']:5.1f}% "
                   f"(train {100 * r['train_accuracy']:5.1f}%), loss {r['losses'][0]:.3f} -> "
                   f"{r['losses'][-1]:.3f}, {r['seconds']:.1f} s", file=sys.stderr)
    print("\nClassification: test accuracy, mean +- std (sample) over seeds\n")
    print(classification_table(runs))
    forecasts = []
    if not args.no_forecast and args.forecast:
        jobs = [(name, kind, seed) for name in args.forecast for seed in range(args.seeds)
                for kind in args.models]
        bar = tqdm(jobs, desc="forecasting", unit="run", file=sys.stderr)
        for name, kind, seed in bar:
            bar.set_postfix_str(f"{name} {kind} seed {seed}")
            forecasts.append(train_forecaster(kind, name, seed, args.forecast_epochs))
            r = forecasts[-1]
            tqdm.write(f"  {name:8s} {kind:11s} seed {seed}: MSE {r['mse']:,.1f} MAE {r['mae']:,.2f}, "
                       f"{r['seconds']:.1f} s", file=sys.stderr)
        print("\nForecasting: one-step-ahead on the held-out end of each series, mean +- std "
              "over seeds (units of the series)\n")
        print(forecasting_table(forecasts))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    result = {"classification": runs, "forecasting": forecasts, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
