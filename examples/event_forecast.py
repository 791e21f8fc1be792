"""Event forecasting with neural temporal point processes: Aaren against a Transformer.

A Transformer-Hawkes-Process-style model (THP, Zuo et al. 2020; the EasyTPP family) reads a
stream of events (time, type) and gives, after every event, the conditional intensity of
each type until the next one. Its encoder is an Aaren stack or the same stack with causal
softmax attention (`aaren.baselines.build_stacks`: same width, depth, heads, layer structure
and, to within 0.1%, parameter count); everything else is the same.

Model, both kinds:
- input of event i (time t_i, type k_i, gap tau_i = t_i - t_{i-1}; times divided by the
  training set's mean gap c): a type embedding + THP's temporal encoding of t_i (sin/cos of
  t_i / 10000^(2j/d)) + sinusoidal positions of the index i + a linear map of log(tau_i + 1e-3);
  dropout; the causal stack (pre-norm, final LayerNorm) -> h_i, which has seen events 1..i.
- intensity head: from h_{i-1}, for each type k and component m = 0..M-1, a coefficient
  a_km > 0 and a rate b_km, and for s = t - t_{i-1} in [0, tau_i]
      lambda_k(t_{i-1} + s) = sum_m a_km exp(b_km s),
  with b_k0 in [0, 20] (a baseline that may grow) and b_km in [-50, 0] for m >= 1 (decaying
  excitations); rates in units of 1/c. The compensator is in closed form,
      int_0^tau lambda_k = sum_m a_km tau (exp(b_km tau) - 1) / (b_km tau),
  so the likelihood is exact (no Monte-Carlo integral). This is RMTPP's exponential
  intensity (Du et al. 2016) per type, as a mixture. The family holds both kinds of true
  processes used here: a Hawkes process with exponential kernels (b = 0 for the baseline,
  b = -beta for each decay) and the self-correcting process (b_k0 = mu_k).
- NLL (the reported metric, nats, times in the files' units): the joint negative
  log-likelihood of times and types, averaged over every event after the first of each
  sequence, -(1/#scored) sum_i [log lambda_{k_i}(t_i) - int_{t_{i-1}}^{t_i} sum_k lambda_k];
  computed in float64. Next time: the model's expected next time t_{i-1} + int_0^inf S(s) ds,
  S = exp(-compensator); next type: argmax_k int_0^inf lambda_k S ds (both by Simpson's rule
  on a geometric grid of 257 points per event; only these predictions use quadrature). RMSE and
  type accuracy over the same events as the NLL.

Recipe, both kinds: AdamW (lr 2e-3, weight decay 0.01), batch 32, linear warm-up over 5% of
the steps then cosine decay, gradient clipping at 1, dropout 0.1, at most 20 epochs with
early stopping on the validation NLL (patience 5); test metrics of the best-validation
weights. Defaults d_model 32, 4 heads, 2 layers, d_ff 64, M = 6 components.

Data (examples/event_data.py, next to this script, holds the file checks, the intensity
family and the simulators): EasyTPP's layout, a JSON list of sequences, each a dict with
`dim_process`, `seq_len`, `time_since_start`, `time_since_last_event` and `type_event`
(0-based types). Every file is checked before use; a bad one is refused with the sequence
(index, from 0) and field named. `time_since_last_event[0]` is only required to be >= 0
(datasets put 0 or the time since an origin there); later entries must equal the
differences of `time_since_start`.

Synthetic processes with known parameters (`--generate`; own samplers, tested in
tests/test_event_forecast.py): the true model's NLL on the same events, exact (closed form),
is the floor that `--process` reports the gap to.
- hawkes2: 2-type Hawkes process, exponential kernels alpha_kj beta_kj exp(-beta_kj t),
  decays 1 (from type 0) and 5 (from type 1), branching ratio 0.54;
- hawkes5: 5-type Hawkes process, decays 0.5, 1, 2, 4, 8 by source type, branching ratio 0.6;
- selfcorrect2: 2-type self-correcting process, lambda_k(t) = exp(mu_k t - sum_j A_kj N_j(t)).
Each sequence starts empty at time 0 (time_since_start is the time since then) and holds
its first L events, L uniform in 30..70.

DIR below: a folder outside the repository (--json creates the record's folder).

    python examples/event_forecast.py --generate hawkes5 --out-dir DIR/hawkes5 --seed 0
    python examples/event_forecast.py --train DIR/hawkes5/train.json \\
        --valid DIR/hawkes5/valid.json --test DIR/hawkes5/test.json \\
        --process DIR/hawkes5/process.json --model aaren --seed 0 --json DIR/records/aaren_0.json
    python examples/event_forecast.py --quick ...     # a pipeline check: tiny model, 2 epochs
    python examples/event_forecast.py --summarize benchmarks/results/events

--summarize DIR prints the table of the records in DIR and writes it to DIR/summary.md (DIR
may also be one record file: then the table is only printed).

The JSON record: model, seed, dataset, nll_per_event, scored_events, rmse_next_time,
type_accuracy, params, epochs_run, best_epoch, train_seconds, the losses, and with
--process the true model's nll_per_event, rmse_next_time, type_accuracy and the gap; a
streaming check (`stream_check`): the trained model scores test sequences one event at a
time with the stack's `step` (Aaren: a state of fixed size) and the largest differences
from the parallel pass are recorded.
"""
import argparse
import copy
import glob
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from aaren.baselines import build_stacks, state_bytes

# The data files, the intensity family and the synthetic processes: event_data.py, next to
# this script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from event_data import (PROCESSES, SPLIT_SIZES, EventDataError, collate, generate,  # noqa: E402
                        load_events, log_likelihood_terms, predict_next, true_metrics)

MODELS = ("aaren", "transformer")
GAP_EPS = 1e-3          # log(tau + GAP_EPS) is the gap feature (tau in units of c)
GROWTH_MAX = 20.0       # b_k0 in [0, GROWTH_MAX]   (rates in 1/c)
DECAY_MAX = 50.0        # b_km in [-DECAY_MAX, 0], m >= 1


# --------------------------------------------------------------------------- the model


def sinusoids(values: Tensor, dim: int) -> Tensor:
    """THP's temporal encoding: [..., dim] (float64), sin / cos of values / 10000^(2j / dim)."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    angle = values.double()[..., None] * freq
    out = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)
    return out[..., :dim]


class EventModel(nn.Module):
    """Embedding -> causal stack (Aaren or Transformer) -> intensity head (module docstring).
    Times in the data's units; `time_scale` (c) is set from the training set."""

    def __init__(self, kind: str, num_types: int, d_model: int = 32, nhead: int = 4,
                 num_layers: int = 2, d_ff: int = 64, dropout: float = 0.1, components: int = 6,
                 time_scale: float = 1.0):
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"unknown model {kind!r}: expected one of {', '.join(MODELS)}")
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        aaren_stack, transformer, self.stack_info = build_stacks(d_model, nhead, num_layers, d_ff,
                                                                 dropout=dropout)
        self.encoder = aaren_stack if kind == "aaren" else transformer
        self.kind, self.num_types, self.components, self.d_model = kind, num_types, components, d_model
        self.register_buffer("time_scale", torch.tensor(float(time_scale), dtype=torch.float64))
        self.type_embedding = nn.Embedding(num_types, d_model)
        self.gap_embedding = nn.Linear(1, d_model)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_types * components * 2)
        with torch.no_grad():  # start near a constant total rate 1/c, decays spread out
            self.head.weight.mul_(0.1)
            bias = self.head.bias.view(num_types, components, 2)
            bias[..., 0] = math.log(1.0 / (num_types * components))
            bias[:, 0, 1] = math.log(0.01 / GROWTH_MAX) - math.log1p(-0.01 / GROWTH_MAX)
            for m in range(1, components):                           # 0.25 ... 16 (1/c)
                rate = 0.25 * 64.0 ** ((m - 1) / max(1, components - 2))
                frac = min(rate / DECAY_MAX, 0.99)
                bias[:, m, 1] = math.log(frac) - math.log1p(-frac)

    def embed(self, types: Tensor, times: Tensor, gaps: Tensor, index: Tensor) -> Tensor:
        """Input tokens [..., d_model] from types, times and gaps (data units) and the
        events' indices in their sequences."""
        c, dtype = self.time_scale, self.gap_embedding.weight.dtype
        gap_feature = torch.log(gaps.double() / c + GAP_EPS).to(dtype)[..., None]
        x = (self.type_embedding(types) + sinusoids(times.double() / c, self.d_model).to(dtype)
             + sinusoids(index, self.d_model).to(dtype) + self.gap_embedding(gap_feature))
        return self.drop(x)

    def forward(self, types: Tensor, times: Tensor, gaps: Tensor) -> Tensor:
        """h [B, L, d_model]: h_i has seen events 0..i of its sequence."""
        index = torch.arange(types.size(1)).expand_as(types)
        return self.encoder(self.embed(types, times, gaps, index))

    def intensity(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        """(la, b) [..., K, M], float64, rates in 1/c (see the module docstring)."""
        raw = self.head(h).double().view(*h.shape[:-1], self.num_types, self.components, 2)
        la = raw[..., 0]
        b = torch.cat([GROWTH_MAX * torch.sigmoid(raw[..., :1, 1]),
                       -DECAY_MAX * torch.sigmoid(raw[..., 1:, 1])], dim=-1)
        return la, b

    def step(self, type_: Tensor, time_: Tensor, gap: Tensor, index: int, state=None):
        """One event per stream ([B] each) -> (h [B, d_model], state). Aaren: the state is
        one (lse, out) per layer, its size fixed; the Transformer: its KV caches."""
        x = self.embed(type_, time_, gap, torch.full_like(type_, index))
        return self.encoder.step(x, state)


def sequence_log_likelihood(model: EventModel, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-event log-likelihood terms [B, L-1] (float64, nats, data units) of events 1..L-1
    given the earlier ones, their mask, and the intensities (la, b) that scored them."""
    h = model(batch["types"], batch["times"], batch["gaps"])
    la, b = model.intensity(h[:, :-1])
    c = model.time_scale
    tau = (batch["times"][:, 1:] - batch["times"][:, :-1]).clamp(min=0) / c
    terms = log_likelihood_terms(la, b, tau, batch["types"][:, 1:]) - torch.log(c)
    mask = batch["mask"][:, 1:]
    return torch.where(mask, terms, torch.zeros_like(terms)), mask, (la, b)


@torch.no_grad()
def evaluate(model: EventModel, seqs: Sequence[dict], batch_size: int = 64,
             predictions: bool = False) -> dict:
    """NLL per scored event (and, with predictions, RMSE of the expected next time and
    type accuracy) over every event after the first of each sequence."""
    model.eval()
    total, scored, se, correct = 0.0, 0, 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = collate(seqs[i:i + batch_size])
        terms, mask, (la, b) = sequence_log_likelihood(model, batch)
        total += float(terms.sum())
        scored += int(mask.sum())
        if predictions and mask.any():
            e_tau, p = predict_next(la[mask], b[mask])
            tau = (batch["times"][:, 1:] - batch["times"][:, :-1])[mask]
            se += float(((e_tau * model.time_scale - tau) ** 2).sum())
            correct += int((p.argmax(-1) == batch["types"][:, 1:][mask]).sum())
    model.train()
    out = {"nll_per_event": -total / max(scored, 1), "scored_events": scored}
    if predictions:
        out.update(rmse_next_time=math.sqrt(se / max(scored, 1)),
                   type_accuracy=correct / max(scored, 1))
    return out


@torch.no_grad()
def stream_sequence(model: EventModel, seq: dict) -> dict:
    """Scores one sequence event by event with `step`, as a live stream: after each event,
    the log-likelihood term of the event that just arrived (from the state before it) and
    the prediction of the next one. Returns the terms [L-1], expected next times [L-1] and
    type probabilities [L-1, K] for events 1..L-1, and the state's bytes after each event."""
    model.eval()
    c = model.time_scale
    state, prev_params, prev_time = None, None, None
    terms, times_pred, probs, sizes = [], [], [], []
    for i in range(seq["seq_len"]):
        t = torch.tensor([float(seq["time_since_start"][i])], dtype=torch.float64)
        k = torch.tensor([int(seq["type_event"][i])])
        gap = torch.tensor([float(seq["time_since_last_event"][i])], dtype=torch.float64)
        if prev_params is not None:
            la, b = prev_params
            tau = ((t - prev_time).clamp(min=0) / c)
            terms.append(log_likelihood_terms(la, b, tau, k) - torch.log(c))
        h, state = model.step(k, t, gap, i, state)
        la, b = model.intensity(h)
        if i + 1 < seq["seq_len"]:
            e_tau, p = predict_next(la, b)
            times_pred.append(t + e_tau * c)
            probs.append(p)
        prev_params, prev_time = (la, b), t
        sizes.append(_state_bytes(state))
    return {"terms": torch.cat(terms), "next_time": torch.cat(times_pred), "probs": torch.cat(probs),
            "state_bytes": sizes}


def _state_bytes(state) -> int:
    return state_bytes(state)[0]


@torch.no_grad()
def parallel_sequence(model: EventModel, seq: dict) -> dict:
    """What stream_sequence returns, from one parallel pass."""
    model.eval()
    batch = collate([seq])
    terms, _, (la, b) = sequence_log_likelihood(model, batch)
    e_tau, p = predict_next(la[0], b[0])
    return {"terms": terms[0], "next_time": batch["times"][0, :-1] + e_tau * model.time_scale,
            "probs": p}


def stream_check(model: EventModel, seqs: Sequence[dict]) -> dict:
    """Largest differences between streaming and the parallel pass over these sequences, and
    the smallest and largest inference state seen (bytes; Aaren's is one size throughout)."""
    diffs = {"terms": 0.0, "next_time": 0.0, "probs": 0.0}
    sizes = set()
    for seq in seqs:
        s, p = stream_sequence(model, seq), parallel_sequence(model, seq)
        for key in diffs:
            diffs[key] = max(diffs[key], float((s[key] - p[key]).abs().max()))
        sizes.update(s["state_bytes"])
    return {"sequences": len(seqs), "events": int(sum(q["seq_len"] for q in seqs)),
            "max_abs_diff_log_likelihood": diffs["terms"],
            "max_abs_diff_next_time": diffs["next_time"],
            "max_abs_diff_type_probability": diffs["probs"],
            "state_bytes_min": min(sizes), "state_bytes_max": max(sizes)}


# --------------------------------------------------------------------------- training


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_gap(seqs: Sequence[dict]) -> float:
    gaps = [t[j] - t[j - 1] for s in seqs for t in [s["time_since_start"]] for j in range(1, len(t))]
    if not gaps or sum(gaps) <= 0:
        raise EventDataError("the training file has no positive gap between events (every "
                             "sequence has one event, or all events at one time)")
    return sum(gaps) / len(gaps)


def train(args, data: Dict[str, dict]) -> Tuple[dict, EventModel]:
    from tqdm import tqdm
    train_seqs, valid_seqs = data["train"]["seqs"], data["valid"]["seqs"]
    torch.manual_seed(args.seed)
    model = EventModel(args.model, data["train"]["num_types"], args.d_model, args.n_heads,
                       args.e_layers, args.d_ff, args.dropout, args.components,
                       time_scale=mean_gap(train_seqs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_seqs) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = max(1, total_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup else
        0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup)))))
    generator = torch.Generator().manual_seed(args.seed)
    initial_val = evaluate(model, valid_seqs)["nll_per_event"]
    best_val, best_state, best_epoch, bad = math.inf, None, 0, 0
    train_losses, val_losses = [], []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_seqs), generator=generator).tolist()
        total, count = 0.0, 0
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"{args.model} seed {args.seed} "
                   f"epoch {epoch + 1}", unit="batch", leave=False, file=sys.stderr, mininterval=10)
        for i in bar:
            batch = collate([train_seqs[j] for j in order[i:i + args.batch_size]])
            terms, mask, _ = sequence_log_likelihood(model, batch)
            n = mask.sum().clamp(min=1)
            loss = -(terms.sum() / n)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(-terms.detach().sum())
            count += int(n)
        train_losses.append(total / max(count, 1))
        val = evaluate(model, valid_seqs)["nll_per_event"]
        val_losses.append(val)
        print(f"  {args.model} seed {args.seed} epoch {epoch + 1}: train NLL {train_losses[-1]:.4f} "
              f"valid NLL {val:.4f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        if val < best_val:
            best_val, best_state, best_epoch, bad = val, copy.deepcopy(model.state_dict()), epoch + 1, 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    train_seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    record = {"model": args.model, "seed": args.seed, "params": parameter_count(model),
              "epochs_run": len(train_losses), "best_epoch": best_epoch,
              "train_seconds": train_seconds, "initial_valid_nll": initial_val,
              "train_nll": train_losses, "valid_nll": val_losses, "time_scale": float(model.time_scale),
              "config": {k: getattr(args, k) for k in ("d_model", "n_heads", "e_layers", "d_ff",
                                                      "dropout", "components", "lr", "weight_decay",
                                                      "batch_size", "epochs", "patience", "quick")}}
    return record, model


# --------------------------------------------------------------------------- reporting


def _mean_std(values: List[float], digits: int = 4) -> str:
    """The mean, and +- the sample standard deviation where there are two values or more (a
    single seed has none; the table's seeds column says how many there are)."""
    mean = f"{statistics.fmean(values):.{digits}f}"
    return f"{mean} +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean


def summary_table(records: List[dict]) -> str:
    """Markdown: per dataset and model, mean +- sample std over seeds (the mean alone for one
    seed) of the NLL, its gap to the true model, the RMSE and the type accuracy; a row for the
    true model where known."""
    lines = ["| process | model | seeds | NLL per event | gap to true NLL | RMSE next time | "
             "type accuracy % | params | train s (mean) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(dict.fromkeys(r["dataset"] for r in records)):
        rs_all = [r for r in records if r["dataset"] == name]
        for kind in MODELS:
            rs = [r for r in rs_all if r["model"] == kind]
            if not rs:
                continue
            gap = (_mean_std([r["gap_to_true_nll"] for r in rs])
                   if all("gap_to_true_nll" in r for r in rs) else "-")
            lines.append(f"| {name} | {kind} | {len(rs)} | {_mean_std([r['nll_per_event'] for r in rs])} | "
                         f"{gap} | {_mean_std([r['rmse_next_time'] for r in rs])} | "
                         f"{_mean_std([100 * r['type_accuracy'] for r in rs], 2)} | {rs[0]['params']:,} | "
                         f"{statistics.fmean(r['train_seconds'] for r in rs):.0f} |")
        truth = [r["true"] for r in rs_all if "true" in r]
        if truth:
            t = truth[0]
            lines.append(f"| {name} | true process | - | {t['nll_per_event']:.4f} | 0 | "
                         f"{t['rmse_next_time']:.4f} | {100 * t['type_accuracy']:.2f} | - | - |")
    return "\n".join(lines)


def summarize(path: str) -> str:
    """The table of the records (``--json`` files) in folder ``path``, also written to
    ``path/summary.md``; ``path`` may also be one record file, whose table is only returned.
    Raises FileNotFoundError when ``path`` does not exist or holds no record."""
    path = os.path.normpath(path)
    if os.path.isfile(path):
        files, folder = [path], None
    elif os.path.isdir(path):
        files, folder = sorted(glob.glob(os.path.join(path, "*.json"))), path
    else:
        raise FileNotFoundError(f"{path} not found: --summarize takes a folder of records "
                                f"(--json files) or one record file")
    records = []
    for name in files:
        try:
            with open(name) as f:
                record = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "nll_per_event" in record and "model" in record:
            records.append(record)
    if not records:
        what = "is no event-forecasting record" if folder is None else "holds no event-forecasting records"
        raise FileNotFoundError(f"{path} {what} (a JSON object with nll_per_event, written by --json)")
    table = summary_table(records)
    if folder is not None:
        with open(os.path.join(folder, "summary.md"), "w") as f:
            f.write(table + "\n")
    return table


def load_process(path: str, num_types: int) -> dict:
    """The process.json of ``--generate`` at ``path``, checked against ``num_types``. Raises
    FileNotFoundError for a missing file and EventDataError for another kind of file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"process file not found: {os.path.normpath(path)} (--generate "
                                f"writes process.json beside train/valid/test.json)")
    try:
        with open(path) as f:
            process = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EventDataError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(process, dict) and {"name", "kind", "mu"} <= set(process)):
        raise EventDataError(f"{path}: not a process.json of --generate (a JSON object with "
                             f"name, kind, mu, ...)")
    if len(process["mu"]) != num_types:
        raise EventDataError(f"{path}: a process of {len(process['mu'])} types, but "
                             f"the files have dim_process {num_types}")
    return process


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", help="training sequences (EasyTPP JSON)")
    parser.add_argument("--valid", help="validation sequences (early stopping)")
    parser.add_argument("--test", help="test sequences (the reported metrics)")
    parser.add_argument("--model", choices=MODELS, default="aaren")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None,
                        help="write the record (a JSON object) here (its folder is created)")
    parser.add_argument("--process", default=None,
                        help="process.json of --generate: also report the true model's metrics "
                             "on the test file and the gap to its NLL")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--e-layers", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--components", type=int, default=6,
                        help="M, per type (default 6: hawkes5's true intensity needs 1 + 5)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--stream-sequences", type=int, default=8,
                        help="test sequences scored one event at a time to check streaming "
                             "against the parallel pass (default 8; 0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="pipeline check, not the protocol: at most 64 training and 32 "
                             "validation / test sequences, 2 epochs, d_model 16, d_ff 32, 2 streamed")
    parser.add_argument("--generate", choices=sorted(PROCESSES), default=None,
                        help="write a synthetic data set (train/valid/test.json, process.json) "
                             "to --out-dir instead of training")
    parser.add_argument("--out-dir", default=None, help="folder for --generate")
    parser.add_argument("--sizes", type=int, nargs=3, default=list(SPLIT_SIZES),
                        metavar=("TRAIN", "VALID", "TEST"),
                        help=f"sequences per split for --generate (default {' '.join(map(str, SPLIT_SIZES))})")
    parser.add_argument("--summarize", default=None, metavar="DIR",
                        help="print the table of the records (--json files) in folder DIR and "
                             "write it to DIR/summary.md; DIR may also be one record file "
                             "(then the table is only printed)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.summarize:
        try:
            table = summarize(args.summarize)
        except FileNotFoundError as error:
            parser.error(str(error))
        print(table)
        if os.path.isdir(args.summarize):
            print(f"(written to {os.path.join(os.path.normpath(args.summarize), 'summary.md')})",
                  file=sys.stderr)
        return {"table": table}
    if args.generate:
        if not args.out_dir:
            parser.error("--generate needs --out-dir")
        if min(args.sizes) < 1:
            parser.error(f"--sizes must be positive, got {args.sizes}")
        meta = generate(args.generate, args.out_dir, args.seed, args.sizes)
        t = meta["true_test"]
        print(f"{args.generate}: wrote {args.out_dir}/{{train,valid,test,process}}.json ("
              + ", ".join(f"{k} {v['sequences']} sequences / {v['events']} events"
                          for k, v in meta["splits"].items())
              + f"); true model on test: NLL {t['nll_per_event']:.4f} per event, RMSE "
              f"{t['rmse_next_time']:.4f}, type accuracy {100 * t['type_accuracy']:.1f} %")
        return meta
    missing = [name for name in ("train", "valid", "test") if not getattr(args, name)]
    if missing:
        parser.error("training needs " + ", ".join(f"--{m}" for m in missing)
                     + " (or --generate / --summarize)")
    for name in ("d_model", "n_heads", "e_layers", "d_ff", "batch_size", "epochs", "patience"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.quick:
        args.epochs, args.d_model, args.d_ff = 2, 16, 32
        args.stream_sequences = min(args.stream_sequences, 2)

    # bad input files end the script with their message (exit 2), not a traceback
    try:
        data = {"train": load_events(args.train)}
        dim = data["train"]["num_types"]
        data["valid"] = load_events(args.valid, dim)
        data["test"] = load_events(args.test, dim)
        process = load_process(args.process, dim) if args.process else None
    except (FileNotFoundError, EventDataError) as error:
        parser.error(str(error))
    if args.quick:
        for split, limit in (("train", 64), ("valid", 32), ("test", 32)):
            data[split]["seqs"] = data[split]["seqs"][:limit]
    dataset = process["name"] if process else os.path.basename(os.path.dirname(os.path.abspath(args.train)))
    print(f"{dataset}: {dim} types; " + ", ".join(
        f"{split} {len(d['seqs'])} sequences / {sum(s['seq_len'] for s in d['seqs'])} events"
        for split, d in data.items()), flush=True)

    try:
        record, model = train(args, data)
    except EventDataError as error:  # e.g. a training file without a positive gap
        parser.error(str(error))
    record = {"dataset": dataset, **record}
    result = evaluate(model, data["test"]["seqs"], predictions=True)
    record.update(result)
    if process is not None:
        truth = true_metrics(process, data["test"]["seqs"])
        record["true"] = truth
        record["gap_to_true_nll"] = result["nll_per_event"] - truth["nll_per_event"]
    if args.stream_sequences:
        record["stream_check"] = stream_check(model, data["test"]["seqs"][:args.stream_sequences])
    record.update(torch_version=torch.__version__, threads=args.threads,
                  files={k: os.path.basename(v["path"]) for k, v in data.items()})
    print(f"{dataset} {args.model} seed {args.seed}: test NLL {record['nll_per_event']:.4f} per event "
          f"({record['scored_events']} events)"
          + (f", gap to the true model {record['gap_to_true_nll']:+.4f}" if process else "")
          + f", RMSE {record['rmse_next_time']:.4f}, type accuracy {100 * record['type_accuracy']:.1f} %, "
          f"{record['params']:,} params, {record['epochs_run']} epochs (best {record['best_epoch']}), "
          f"{record['train_seconds']:.0f} s", flush=True)
    if "stream_check" in record:
        sc = record["stream_check"]
        print(f"  streaming ({sc['events']} events, step by step) vs parallel: log-likelihood terms "
              f"differ by at most {sc['max_abs_diff_log_likelihood']:.2e}; state "
              f"{sc['state_bytes_min']:,} to {sc['state_bytes_max']:,} bytes", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
