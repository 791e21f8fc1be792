"""UEA multivariate classification with Time-Series-Library's (TSLib) classification recipe:
Aaren against the same model with causal softmax attention, and (`--models ...
no-attention`) against the ablation without attention.

Datasets: Handwriting (3 channels, length 152, 26 classes, 150 train / 850 test cases),
read from `<data-dir>/classification/Handwriting/Handwriting_{TRAIN,TEST}.ts.gz`, and
JapaneseVowels (12 channels, length 7..29, 9 classes, 270 / 370), which ships inside
sktime. Nothing is downloaded.

Model (both kinds, `SequenceModel` of examples/classify_timeseries.py; only the attention
differs): per-channel standardization with the training cases' statistics, Linear(channels,
d_model) + sinusoidal positions -> the causal stacks of `aaren.baselines.build_stacks`
(pre-norm layers, final LayerNorm, parameter counts matched) -> mean of the outputs over the
valid (unpadded) steps -> Linear(d_model, classes). Variable-length cases are right-padded;
both models are causal, so the padding cannot reach the valid steps. Sizes are TSLib's:
3 layers, d_model 128, d_ff 256, 8 heads, dropout 0.1.

`--models` takes any of aaren, transformer and no-attention (default: the first two).
no-attention is the ablation: the Transformer's stack with every attention's output
replaced by zeros (`aaren.baselines.remove_attention`; the rest, and its initialization, the
Transformer's of the same seed). `--pool last` classifies from the output at each case's
last valid step instead of the mean over the steps: the causal stacks' last step is the
only one that has seen the whole case, so everything the classifier knows of the earlier
steps passed through the attention (without it, the last step alone).

Recipe, the same for both: RAdam (TSLib's classification optimizer), lr 1e-3 held
constant, batch 16, gradient norm clipped at 4, at most 100 epochs; a stratified 20 %
validation split is carved from the training cases (per seed, scikit-learn's
`train_test_split`), the test cases are never looked at during training; early stopping
with patience 10 on the validation accuracy (ties broken by the lower validation loss), and
the test accuracy of the best-validation weights. Seeds change the validation split, the
initialization and the batch order.

    python examples/classify_uea.py --seeds 0 1 2 3 4 --json uea.json   # docs/results.md
    python examples/classify_uea.py --datasets JapaneseVowels --models aaren transformer \\
        no-attention --pool last --seeds 0 1 2 --json uea_last.json
    python examples/classify_uea.py --quick       # pipeline check: one seed, 5 epochs, d_model 32
"""
import argparse
import copy
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classify_timeseries import (MODEL_CHOICES, POOLS, SequenceModel,  # noqa: E402
                                 add_training_arguments, as_dataset, load_classification, pad,
                                 parameter_count, training_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "..", "shared", "data")
DATASETS = ("Handwriting", "JapaneseVowels")
# Standard split sizes (UEA archive), checked at load time.
SIZES = {"Handwriting": (150, 850), "JapaneseVowels": (270, 370)}


def load_uea(name: str, data_dir: str, data_dir_given: bool = True) -> dict:
    """The dataset as load_classification's dict (lists of float32 [T_i, C], int labels).

    Raises FileNotFoundError naming a missing file (normalized path), its source and, when
    ``data_dir_given`` is False (the default folder was used), the --data-dir option;
    ValueError for a file with other than the standard split sizes."""
    if name == "JapaneseVowels":
        data = load_classification(name)  # the .ts files inside the installed sktime
    else:
        from sktime.datasets import load_from_tsfile
        nested = {}
        for split in ("train", "test"):
            path = os.path.normpath(
                os.path.join(data_dir, "classification", name, f"{name}_{split.upper()}.ts.gz"))
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"UEA data file not found: {path}. {name} comes from the UEA multivariate "
                    f"archive (timeseriesclassification.com, Multivariate_ts/{name}); the project "
                    f"expects it gzip-compressed under ../shared/data/classification/{name}/ "
                    f"relative to its root (see that folder's README.md)"
                    + ("." if data_dir_given else ", or pass --data-dir."))
            # load_from_tsfile reads a path, not a stream: decompress into a temporary file.
            with tempfile.TemporaryDirectory() as tmp:
                plain = os.path.join(tmp, f"{name}_{split.upper()}.ts")
                with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                nested[split] = load_from_tsfile(plain, return_data_type="nested_univ")
        data = as_dataset(name, nested)
    sizes = (len(data["X_train"]), len(data["X_test"]))
    if sizes != SIZES[name]:
        raise ValueError(f"{name}: {sizes[0]} train / {sizes[1]} test cases, expected the "
                         f"standard {SIZES[name][0]} / {SIZES[name][1]}")
    return data


@torch.no_grad()
def evaluate(model: SequenceModel, x: Tensor, lengths: Tensor, y: Tensor,
             batch_size: int = 256):
    """(accuracy, mean cross-entropy) of model on the padded cases x."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        lens = lengths[i:i + batch_size]
        logits = model.classify(x[i:i + batch_size, :int(lens.max())], lens)
        correct += int((logits.argmax(-1) == y[i:i + batch_size]).sum())
        loss += float(F.cross_entropy(logits, y[i:i + batch_size], reduction="sum"))
    model.train()
    return correct / len(y), loss / len(y)


def train_one(kind: str, data: dict, seed: int, args) -> dict:
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm
    idx = np.arange(len(data["y_train"]))
    fit_idx, val_idx = train_test_split(idx, test_size=0.2, random_state=seed,
                                        stratify=data["y_train"])
    seqs = [data["X_train"][i] for i in fit_idx]
    stacked = np.concatenate(seqs, axis=0)
    mean, std = np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0) + 1e-6
    x_fit, len_fit = pad(seqs, mean, std)
    x_val, len_val = pad([data["X_train"][i] for i in val_idx], mean, std)
    x_test, len_test = pad(data["X_test"], mean, std)
    y_fit = torch.from_numpy(data["y_train"][fit_idx])
    y_val = torch.from_numpy(data["y_train"][val_idx])
    y_test = torch.from_numpy(data["y_test"])
    max_len = max(x_fit.size(1), x_val.size(1), x_test.size(1))

    torch.manual_seed(seed)
    model = SequenceModel(kind, x_fit.size(2), len(data["classes"]), args.d_model, args.n_heads,
                          args.e_layers, args.dropout, max_len, dim_feedforward=args.d_ff,
                          pool=args.pool)
    optimizer = torch.optim.RAdam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, bad_epochs = (-1.0, math.inf), None, 0
    train_losses, val_history = [], []
    start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"{data['name']} {kind} seed {seed}", unit="epoch",
               leave=False, file=sys.stderr, mininterval=10)
    for _ in bar:
        order = torch.randperm(len(y_fit), generator=generator)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            b = order[i:i + args.batch_size]
            lengths = len_fit[b]
            loss = F.cross_entropy(model.classify(x_fit[b, :int(lengths.max())], lengths), y_fit[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
            optimizer.step()
            total += loss.item() * len(b)
        train_losses.append(total / len(y_fit))
        acc, vloss = evaluate(model, x_val, len_val, y_val)
        val_history.append([acc, vloss])
        bar.set_postfix_str(f"loss {train_losses[-1]:.3f} val acc {acc:.3f}")
        if acc > best[0] or (acc == best[0] and vloss < best[1]):
            best, best_state, bad_epochs = (acc, vloss), copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                break
    train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    test_acc, test_loss = evaluate(model, x_test, len_test, y_test)
    return {"model": kind, "dataset": data["name"], "seed": seed, "test_accuracy": test_acc,
            "test_loss": test_loss, "val_accuracy": best[0], "params": parameter_count(model),
            "train_seconds": train_seconds, "epochs_run": len(train_losses),
            "best_epoch": 1 + [h[0] for h in val_history].index(best[0]),
            "train_losses": train_losses, "val_history": val_history,
            "cases": {"fit": len(y_fit), "val": len(y_val), "test": len(y_test)},
            "config": {"pool": args.pool, **training_config(args)}}


def summary(records: List[dict]) -> str:
    lines = ["| dataset | pool | model | test accuracy | params | train s (mean) | epochs (mean) | n |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["dataset"] for r in records):
        for kind in MODEL_CHOICES:
            rs = [r for r in records if r["dataset"] == name and r["model"] == kind]
            if not rs:
                continue
            accs = [100 * r["test_accuracy"] for r in rs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            pool = rs[0].get("config", {}).get("pool", "mean")
            lines.append(f"| {name} | {pool} | {kind} | {statistics.fmean(accs):.1f} +- {sd:.1f} % | "
                         f"{rs[0]['params']:,} | {statistics.fmean(r['train_seconds'] for r in rs):.0f} | "
                         f"{statistics.fmean(r['epochs_run'] for r in rs):.0f} | {len(rs)} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None,
                        help="folder holding classification/Handwriting/ (default ../shared/data)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    add_training_arguments(parser, d_model=128, n_heads=8, e_layers=3, d_ff=256, dropout=0.1,
                           lr=1e-3, batch_size=16, epochs=100, patience=10)
    parser.add_argument("--pool", default="mean", choices=POOLS,
                        help="mean (default): the mean of the outputs over the valid steps; last: "
                             "the output at the last valid step alone (see the module docstring)")
    parser.add_argument("--quick", action="store_true",
                        help="pipeline check, not the recipe: 5 epochs, d_model 32, 4 heads, d_ff 64")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.d_model, args.n_heads, args.d_ff = 5, 32, 4, 64
    torch.set_num_threads(args.threads)

    records = []
    for name in args.datasets:
        # a missing or malformed file ends the script with its message (exit 2), not a
        # traceback; load_uea itself raises
        try:
            data = load_uea(name, args.data_dir or DATA_DIR, data_dir_given=args.data_dir is not None)
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        lengths = [len(s) for s in data["X_train"] + data["X_test"]]
        print(f"{name}: {len(data['X_train'])} train / {len(data['X_test'])} test cases, "
              f"{data['X_train'][0].shape[1]} channels, length {min(lengths)}..{max(lengths)}, "
              f"{len(data['classes'])} classes", flush=True)
        for seed in args.seeds:
            for kind in args.models:
                r = train_one(kind, data, seed, args)
                records.append(r)
                print(f"  {name} {kind:12s} seed {seed}: test acc {100 * r['test_accuracy']:.1f} % "
                      f"(val {100 * r['val_accuracy']:.1f} %, best epoch {r['best_epoch']} of "
                      f"{r['epochs_run']}), loss {r['train_losses'][0]:.3f} -> "
                      f"{r['train_losses'][-1]:.3f}, {r['train_seconds']:.0f} s", flush=True)
                if args.json:  # after every run, so that an interrupted job keeps what it finished
                    with open(args.json, "w") as f:
                        json.dump(records, f, indent=1)
    print()
    print(summary(records))
    return records


if __name__ == "__main__":
    main()
