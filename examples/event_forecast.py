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

Data: EasyTPP's layout, a JSON list of sequences, each a dict with `dim_process`, `seq_len`,
`time_since_start`, `time_since_last_event` and `type_event` (0-based types). Every file is
checked before use; a bad one is refused with the sequence (index, from 0) and field named.
`time_since_last_event[0]` is only required to be >= 0 (datasets put 0 or the time since an
origin there); later entries must equal the differences of `time_since_start`.

Synthetic processes with known parameters (`--generate`; own samplers, tested in
tests/test_event_forecast.py): the true model's NLL on the same events, exact (closed form),
is the floor that `--process` reports the gap to.
- hawkes2: 2-type Hawkes process, exponential kernels alpha_kj beta_kj exp(-beta_kj t),
  decays 1 (from type 0) and 5 (from type 1), branching ratio 0.54;
- hawkes5: 5-type Hawkes process, decays 0.5, 1, 2, 4, 8 by source type, branching ratio 0.6;
- selfcorrect2: 2-type self-correcting process, lambda_k(t) = exp(mu_k t - sum_j A_kj N_j(t)).
Each sequence starts empty at time 0 (time_since_start is the time since then) and holds
its first L events, L uniform in 30..70.

    python examples/event_forecast.py --generate hawkes5 --out-dir data/hawkes5 --seed 0
    python examples/event_forecast.py --train data/hawkes5/train.json \\
        --valid data/hawkes5/valid.json --test data/hawkes5/test.json \\
        --process data/hawkes5/process.json --model aaren --seed 0 --json aaren_0.json
    python examples/event_forecast.py --quick ...     # a pipeline check: tiny model, 2 epochs
    python examples/event_forecast.py --summarize benchmarks/results/events

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aaren.baselines import build_stacks, state_bytes

MODELS = ("aaren", "transformer")
FIELDS = ("dim_process", "seq_len", "time_since_start", "time_since_last_event", "type_event")
GAP_EPS = 1e-3          # log(tau + GAP_EPS) is the gap feature (tau in units of c)
GROWTH_MAX = 20.0       # b_k0 in [0, GROWTH_MAX]   (rates in 1/c)
DECAY_MAX = 50.0        # b_km in [-DECAY_MAX, 0], m >= 1
QUAD_POINTS = 257       # grid of the expected-time / type quadrature (Simpson, odd)
TAIL_COMPENSATOR = 40.0  # the grid ends where the compensator exceeds this (S < 4e-18)


# --------------------------------------------------------------------------- data files


class EventDataError(ValueError):
    """A malformed event file: the message names the file, the sequence index and the field."""


def _where(path: str, index: int, field: str) -> str:
    return f"{path}: sequence {index}, field {field!r}"


def check_sequences(seqs, path: str = "<data>", num_types: Optional[int] = None) -> int:
    """Checks a loaded EasyTPP list of sequences; returns dim_process. Raises EventDataError
    naming the sequence (index in the list, from 0) and field of the first problem."""
    if not isinstance(seqs, list):
        raise EventDataError(f"{path}: expected a JSON list of sequences, got {type(seqs).__name__}")
    if not seqs:
        raise EventDataError(f"{path}: no sequences")
    dim = num_types
    for i, seq in enumerate(seqs):
        if not isinstance(seq, dict):
            raise EventDataError(f"{path}: sequence {i} is a {type(seq).__name__}, expected a dict "
                                 f"with fields {', '.join(FIELDS)}")
        for field in FIELDS:
            if field not in seq:
                raise EventDataError(f"{_where(path, i, field)}: missing (a sequence needs "
                                     f"{', '.join(FIELDS)})")
        d = seq["dim_process"]
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise EventDataError(f"{_where(path, i, 'dim_process')}: {d!r} is not a positive integer")
        if dim is None:
            dim = d
        elif d != dim:
            raise EventDataError(f"{_where(path, i, 'dim_process')}: {d}, but "
                                 f"{'the model has' if num_types else 'earlier sequences have'} {dim}")
        n = seq["seq_len"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise EventDataError(f"{_where(path, i, 'seq_len')}: {n!r} is not a count of events")
        for field in ("time_since_start", "time_since_last_event", "type_event"):
            values = seq[field]
            if not isinstance(values, list):
                raise EventDataError(f"{_where(path, i, field)}: expected a list, got "
                                     f"{type(values).__name__}")
            if len(values) != n:
                raise EventDataError(f"{_where(path, i, field)}: {len(values)} entries, but "
                                     f"seq_len is {n}")
        if n == 0:
            raise EventDataError(f"{_where(path, i, 'type_event')}: the sequence is empty "
                                 f"(seq_len 0, no events)")
        for field in ("time_since_start", "time_since_last_event"):
            for j, v in enumerate(seq[field]):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise EventDataError(f"{_where(path, i, field)}: event {j} has {v!r}, "
                                         f"not a finite number")
        for j, k in enumerate(seq["type_event"]):
            if isinstance(k, bool) or not isinstance(k, int):
                raise EventDataError(f"{_where(path, i, 'type_event')}: event {j} has {k!r}, "
                                     f"not an integer type")
            if not 0 <= k < dim:
                raise EventDataError(f"{_where(path, i, 'type_event')}: event {j} has type {k}, "
                                     f"outside 0..{dim - 1} (dim_process {dim})")
        t = seq["time_since_start"]
        dt = seq["time_since_last_event"]
        for j in range(1, n):
            if t[j] < t[j - 1]:
                raise EventDataError(f"{_where(path, i, 'time_since_start')}: not sorted: event {j} "
                                     f"at {t[j]!r} comes after event {j - 1} at {t[j - 1]!r}")
        for j in range(n):
            if dt[j] < 0:
                raise EventDataError(f"{_where(path, i, 'time_since_last_event')}: negative gap "
                                     f"{dt[j]!r} at event {j}")
        for j in range(1, n):
            diff = t[j] - t[j - 1]
            if abs(dt[j] - diff) > 1e-6 * max(1.0, abs(t[j])):
                raise EventDataError(f"{_where(path, i, 'time_since_last_event')}: {dt[j]!r} at event "
                                     f"{j}, but time_since_start goes from {t[j - 1]!r} to {t[j]!r} "
                                     f"(a gap of {diff!r})")
    return dim


def load_events(path: str, num_types: Optional[int] = None) -> dict:
    """An EasyTPP JSON file -> {"seqs", "num_types", "path"} after check_sequences."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"event file not found: {path!r} (make one with --generate)")
    with open(path) as f:
        try:
            seqs = json.load(f)
        except json.JSONDecodeError as e:
            raise EventDataError(f"{path}: not valid JSON ({e})") from None
    dim = check_sequences(seqs, path, num_types)
    return {"seqs": seqs, "num_types": dim, "path": path}


def collate(seqs: Sequence[dict]) -> Dict[str, Tensor]:
    """Right-padded float64 times and gaps [B, L], int64 types [B, L], bool mask [B, L]."""
    n = max(s["seq_len"] for s in seqs)
    times = torch.zeros(len(seqs), n, dtype=torch.float64)
    gaps = torch.zeros(len(seqs), n, dtype=torch.float64)
    types = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for b, s in enumerate(seqs):
        m = s["seq_len"]
        times[b, :m] = torch.tensor(s["time_since_start"], dtype=torch.float64)
        gaps[b, :m] = torch.tensor(s["time_since_last_event"], dtype=torch.float64)
        types[b, :m] = torch.tensor(s["type_event"])
        mask[b, :m] = True
    return {"times": times, "gaps": gaps, "types": types, "mask": mask}


def to_easytpp(times: np.ndarray, types: np.ndarray, dim: int) -> dict:
    times = [float(v) for v in times]
    gaps = [times[0]] + [times[j] - times[j - 1] for j in range(1, len(times))]
    return {"dim_process": dim, "seq_len": len(times), "time_since_start": times,
            "time_since_last_event": gaps, "type_event": [int(k) for k in types]}


# --------------------------------------------------------------------------- intensity math
#
# A piecewise intensity after event i-1 is given by (la, b) of shape [..., K, M]:
# lambda_k(s) = sum_m exp(la_km + b_km s), s >= 0 the time since event i-1 (la = -inf: an
# absent component). Shared by the model's head and by the true processes.


def _log_phi(x: Tensor) -> Tensor:
    """log((exp(x) - 1) / x), stable for every x (0 at x = 0), with finite gradients; its
    series x/2 + x^2/24 - x^4/2880 near 0, where the closed form cancels."""
    small = x.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(x), x)
    pos = safe + torch.log(-torch.expm1(-safe)) - torch.log(safe.abs())
    neg = torch.log(-torch.expm1(safe)) - torch.log(safe.abs())
    return torch.where(small, x / 2 + x * x / 24, torch.where(safe > 0, pos, neg))


def log_intensity(la: Tensor, b: Tensor, s: Tensor) -> Tensor:
    """log lambda_k(s) [..., K] for s [...]."""
    return torch.logsumexp(la + b * s[..., None, None], dim=-1)


def compensator(la: Tensor, b: Tensor, s: Tensor) -> Tensor:
    """int_0^s sum_k lambda_k, closed form, [...] for s [...] (>= 0)."""
    x = (b * s[..., None, None]).clamp(max=700.0)
    per_type = torch.logsumexp(la + _log_phi(x), dim=-1).exp()  # [..., K]
    return s * per_type.sum(-1)


def log_likelihood_terms(la: Tensor, b: Tensor, tau: Tensor, k: Tensor) -> Tensor:
    """log lambda_k(tau) - int_0^tau sum lambda: the log density of (tau, k), [...]."""
    log_lam = log_intensity(la, b, tau).gather(-1, k[..., None]).squeeze(-1)
    return log_lam - compensator(la, b, tau)


@torch.no_grad()
def predict_next(la: Tensor, b: Tensor, points: int = QUAD_POINTS, chunk: int = 512
                 ) -> Tuple[Tensor, Tensor]:
    """(E[tau] [N], P(k) [N, K]) for intensities (la, b) [N, K, M]: E[tau] = int S ds and
    P(k) = int lambda_k S ds, S = exp(-compensator). Simpson's rule in log s on a geometric
    grid of `points` points from 1e-9 s_max to s_max, where s_max is where the compensator
    first exceeds 40 (S < 5e-18; found by doubling, at most 2^60 times the start of 1);
    [0, 1e-9 s_max] adds s S(0) and s lambda_k(0). On the grid the closed forms are taken
    directly (a expm1(b s) / b; b s <= 700), not in log space as for the likelihood."""
    la, b = la.double(), b.double()
    if points % 2 == 0:
        points += 1
    u = torch.linspace(math.log(1e-9), 0.0, points, dtype=torch.float64)
    weights = torch.ones(points, dtype=torch.float64)            # Simpson: 1 4 2 4 ... 4 1
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    weights *= (u[1] - u[0]) / 3
    expected, probs = [], []
    for start in range(0, la.size(0), chunk):
        a, r = la[start:start + chunk], b[start:start + chunk]
        s_max = torch.ones(a.size(0), dtype=torch.float64)
        for _ in range(60):
            short = compensator(a, r, s_max) < TAIL_COMPENSATOR
            if not short.any():
                break
            s_max = torch.where(short, 2 * s_max, s_max)
        grid = s_max[:, None] * u.exp()[None, :]                     # [n, G]
        coef = a.exp()[:, None]                                       # [n, 1, K, M]
        rate = r[:, None]
        x = (rate * grid[..., None, None]).clamp(max=700.0)
        growth = torch.expm1(x)
        small = rate.abs() < 1e-12
        ratio = torch.where(small, grid[..., None, None].expand_as(x),
                            growth / torch.where(small, torch.ones_like(rate), rate))
        cum = (coef * ratio).sum((-1, -2))                            # [n, G]
        surv = torch.exp(-cum)
        lam = (coef * (growth + 1)).sum(-1)                            # [n, G, K]
        jac = grid * weights                                           # ds = s du
        e_tau = grid[:, 0] + (surv * jac).sum(1)
        p = grid[:, 0, None] * a.exp().sum(-1) + (lam * (surv * jac)[..., None]).sum(1)
        expected.append(e_tau)
        probs.append(p)
    return torch.cat(expected), torch.cat(probs)


# --------------------------------------------------------------------------- true processes

PROCESSES = {
    "hawkes2": {
        "kind": "hawkes",
        "mu": [0.3, 0.2],
        # alpha[k][j]: expected children of type k per event of type j; beta[k][j]: decay
        "alpha": [[0.4, 0.2], [0.1, 0.4]],
        "beta": [[1.0, 5.0], [1.0, 5.0]],
    },
    "hawkes5": {
        "kind": "hawkes",
        "mu": [0.1, 0.05, 0.1, 0.05, 0.1],
        "alpha": [[0.3, 0.1, 0.0, 0.0, 0.2],
                  [0.2, 0.3, 0.1, 0.0, 0.0],
                  [0.0, 0.2, 0.3, 0.1, 0.0],
                  [0.0, 0.0, 0.2, 0.3, 0.1],
                  [0.1, 0.0, 0.0, 0.2, 0.3]],
        "beta": [[0.5, 1.0, 2.0, 4.0, 8.0]] * 5,
    },
    "selfcorrect2": {
        "kind": "selfcorrecting",
        "mu": [1.0, 0.7],
        # lambda_k(t) = exp(mu_k t - sum_j A[k][j] N_j(t))
        "A": [[1.0, 0.5], [0.3, 1.0]],
    },
}
LENGTHS = (30, 70)          # sequence lengths, uniform in this range (inclusive)
SPLIT_SIZES = (1500, 300, 500)


def branching_ratio(alpha) -> float:
    return float(max(abs(np.linalg.eigvals(np.asarray(alpha, dtype=np.float64)))))


def stationary_rates(process: dict) -> np.ndarray:
    """Hawkes: the stationary intensities (I - alpha)^-1 mu; self-correcting: the long-run
    rates A^-1 mu (mu_k t - (A N)_k stays bounded)."""
    if process["kind"] == "hawkes":
        alpha = np.asarray(process["alpha"], dtype=np.float64)
        return np.linalg.solve(np.eye(len(alpha)) - alpha, np.asarray(process["mu"], dtype=np.float64))
    return np.linalg.solve(np.asarray(process["A"], dtype=np.float64), np.asarray(process["mu"], dtype=np.float64))


def _room(times: np.ndarray, types: np.ndarray, index: int) -> Tuple[np.ndarray, np.ndarray]:
    """The event arrays of the samplers, widened (doubled) until column `index` exists."""
    if index < times.shape[1]:
        return times, types
    width = times.shape[1]
    while width <= index:
        width *= 2
    grow = width - times.shape[1]
    return (np.pad(times, ((0, 0), (0, grow))), np.pad(types, ((0, 0), (0, grow))))


def simulate_hawkes(process: dict, lengths: Sequence[int], rng: np.random.Generator,
                    max_time: float = math.inf) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Ogata's thinning, all sequences at once: each starts empty at time 0 and stops after
    lengths[s] events or at max_time. Kernels phi_kj(t) = alpha_kj beta_kj exp(-beta_kj t).
    Between events the intensity only decays, so its value at the current time bounds it
    until the next event. Returns [(times, types)]."""
    mu = np.asarray(process["mu"], dtype=np.float64)
    alpha = np.asarray(process["alpha"], dtype=np.float64)
    beta = np.asarray(process["beta"], dtype=np.float64)
    jump = alpha * beta                                  # [k, j]: lambda_k's jump at an event of type j
    lengths = np.asarray(lengths, dtype=np.int64)
    n_seq, k_types = len(lengths), len(mu)
    times = np.zeros((n_seq, 64))
    types = np.zeros((n_seq, 64), dtype=np.int64)
    count = np.zeros(n_seq, dtype=np.int64)
    excite = np.zeros((n_seq, k_types, k_types))   # [s, k, j]: the part of lambda_k due to type j
    now = np.zeros(n_seq)
    active = count < lengths
    while active.any():
        idx = np.nonzero(active)[0]
        bound = mu.sum() + excite[idx].sum((1, 2))    # lambda(now): decays until the next event
        wait = rng.exponential(1.0 / bound)
        now[idx] += wait
        excite[idx] *= np.exp(-beta[None] * wait[:, None, None])
        over = now[idx] > max_time
        active[idx[over]] = False
        idx, bound = idx[~over], bound[~over]
        lam = mu[None] + excite[idx].sum(2)           # [n, K]
        total = lam.sum(1)
        accept = rng.uniform(size=len(idx)) * bound <= total
        acc = idx[accept]
        if len(acc):
            times, types = _room(times, types, count[acc].max())
            cum = np.cumsum(lam[accept] / total[accept, None], axis=1)
            k = (rng.uniform(size=(len(acc), 1)) > cum).sum(1).clip(max=k_types - 1)
            times[acc, count[acc]] = now[acc]
            types[acc, count[acc]] = k
            excite[acc, :, k] += jump[:, k].T
            count[acc] += 1
        active[idx] = count[idx] < lengths[idx]
    return [(times[s, :count[s]].copy(), types[s, :count[s]].copy()) for s in range(n_seq)]


def simulate_self_correcting(process: dict, lengths: Sequence[int], rng: np.random.Generator,
                             max_time: float = math.inf) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Inversion, all sequences at once: lambda_k(t) = exp(mu_k t - sum_j A_kj N_j(t)),
    mu_k > 0. After an event at t0 the compensator to t0 + s is
    sum_k exp(c_k) (exp(mu_k s) - 1) / mu_k (c_k = log lambda_k(t0)), convex and increasing
    in s; the next gap solves compensator = E, E ~ Exp(1), by Newton's method from s = 0
    (monotone after the first step for a convex function), to 1e-12 relative. The type is
    k with probability lambda_k / lambda at the event."""
    mu = np.asarray(process["mu"], dtype=np.float64)
    a_mat = np.asarray(process["A"], dtype=np.float64)
    if (mu <= 0).any():
        raise ValueError("simulate_self_correcting needs every mu_k > 0")
    lengths = np.asarray(lengths, dtype=np.int64)
    n_seq, k_types = len(lengths), len(mu)
    times = np.zeros((n_seq, 64))
    types = np.zeros((n_seq, 64), dtype=np.int64)
    count = np.zeros(n_seq, dtype=np.int64)
    counts = np.zeros((n_seq, k_types))
    now = np.zeros(n_seq)
    active = count < lengths
    while active.any():
        idx = np.nonzero(active)[0]
        c = mu[None] * now[idx, None] - counts[idx] @ a_mat.T       # [n, K]: log lambda_k(now)
        target = rng.exponential(size=len(idx))
        s = np.zeros(len(idx))
        for _ in range(200):
            grow = np.exp(c + mu[None] * s[:, None])
            value = ((grow - np.exp(c)) / mu[None]).sum(1) - target
            step = value / grow.sum(1)
            s = s - step
            if (np.abs(step) <= 1e-12 * np.maximum(s, 1e-300)).all():
                break
        now[idx] += s
        over = now[idx] > max_time
        active[idx[over]] = False
        idx, c, s = idx[~over], c[~over], s[~over]
        lam = np.exp(c + mu[None] * s[:, None])
        cum = np.cumsum(lam / lam.sum(1, keepdims=True), axis=1)
        k = (rng.uniform(size=(len(idx), 1)) > cum).sum(1).clip(max=k_types - 1)
        if len(idx):
            times, types = _room(times, types, count[idx].max())
        times[idx, count[idx]] = now[idx]
        types[idx, count[idx]] = k
        counts[idx, k] += 1
        count[idx] += 1
        active[idx] = count[idx] < lengths[idx]
    return [(times[s, :count[s]].copy(), types[s, :count[s]].copy()) for s in range(n_seq)]


def simulate(process: dict, lengths: Sequence[int], rng: np.random.Generator,
             max_time: float = math.inf) -> List[Tuple[np.ndarray, np.ndarray]]:
    if process["kind"] == "hawkes":
        return simulate_hawkes(process, lengths, rng, max_time)
    if process["kind"] == "selfcorrecting":
        return simulate_self_correcting(process, lengths, rng, max_time)
    raise ValueError(f"unknown process kind {process['kind']!r}")


def true_intensity_params(process: dict, times: Tensor, types: Tensor) -> Tuple[Tensor, Tensor]:
    """The true process's intensity after each event of one sequence, in the (la, b) form
    of the head: [L, K, M] (float64), row i for the interval after event i, given every event
    up to and including i (the history starts empty at time 0).
    Hawkes: M = 1 + K, component 0 the baseline mu_k (b = 0), component 1 + j the excitation
    from type j, b = -beta_kj. Self-correcting: M = 1, la = mu_k t_i - (A N(t_i))_k, b = mu_k."""
    times = torch.as_tensor(times, dtype=torch.float64)
    types = torch.as_tensor(types, dtype=torch.long)
    n = len(times)
    mu = torch.tensor(process["mu"], dtype=torch.float64)
    k_types = len(mu)
    onehot = F.one_hot(types, k_types).double()                     # [L, K]
    if process["kind"] == "hawkes":
        alpha = torch.tensor(process["alpha"], dtype=torch.float64)
        beta = torch.tensor(process["beta"], dtype=torch.float64)
        excite = torch.zeros(k_types, k_types, dtype=torch.float64)
        rows = []
        for i in range(n):
            if i > 0:
                excite = excite * torch.exp(-beta * (times[i] - times[i - 1]))
            excite = excite + alpha * beta * onehot[i][None, :]
            rows.append(excite.clone())
        excite = torch.stack(rows)                                  # [L, K, K]
        la = torch.cat([mu.log().expand(n, k_types)[..., None], excite.log()], dim=-1)
        b = torch.cat([torch.zeros(n, k_types, 1, dtype=torch.float64),
                       (-beta).expand(n, k_types, k_types)], dim=-1)
        return la, b
    if process["kind"] == "selfcorrecting":
        a_mat = torch.tensor(process["A"], dtype=torch.float64)
        counts = onehot.cumsum(0)                                   # N(t_i), event i included
        la = mu[None] * times[:, None] - counts @ a_mat.T
        return la[..., None], mu.expand(n, k_types)[..., None].clone()
    raise ValueError(f"unknown process kind {process['kind']!r}")


def true_metrics(process: dict, seqs: Sequence[dict], predictions: bool = True) -> dict:
    """The true model on these sequences, conditional on each first event: NLL per scored
    event (exact, closed form), RMSE of its expected next time, accuracy of its most likely
    next type (quadrature, as for the model)."""
    las, bs, taus, ks = [], [], [], []
    for seq in seqs:
        times = torch.tensor(seq["time_since_start"], dtype=torch.float64)
        types = torch.tensor(seq["type_event"])
        if len(times) < 2:
            continue
        la, b = true_intensity_params(process, times, types)
        las.append(la[:-1])
        bs.append(b[:-1])
        taus.append(times[1:] - times[:-1])
        ks.append(types[1:])
    la, b, tau, k = torch.cat(las), torch.cat(bs), torch.cat(taus), torch.cat(ks)
    out = {"nll_per_event": -float(log_likelihood_terms(la, b, tau, k).mean()),
           "scored_events": len(tau)}
    if predictions:
        e_tau, p = predict_next(la, b)
        out.update(rmse_next_time=float(((e_tau - tau) ** 2).mean().sqrt()),
                   type_accuracy=float((p.argmax(-1) == k).double().mean()))
    return out


def generate(name: str, out_dir: str, seed: int, sizes: Sequence[int] = SPLIT_SIZES) -> dict:
    """Writes out_dir/{train,valid,test}.json (EasyTPP layout) and out_dir/process.json (the
    name, kind and parameters, the seed and sizes, and the true model's test metrics)."""
    process = PROCESSES[name]
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    dim = len(process["mu"])
    counts = {}
    test = None
    for split, size in zip(("train", "valid", "test"), sizes):
        lengths = rng.integers(LENGTHS[0], LENGTHS[1] + 1, size=size)
        seqs = [to_easytpp(t, k, dim) for t, k in simulate(process, lengths, rng)]
        check_sequences(seqs, f"{split} (generated)")
        with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
            json.dump(seqs, f)
        counts[split] = {"sequences": size, "events": int(sum(s["seq_len"] for s in seqs))}
        test = seqs
    meta = {"name": name, **process, "seed": seed, "lengths": list(LENGTHS), "splits": counts,
            "stationary_rates": stationary_rates(process).tolist(),
            "true_test": true_metrics(process, test)}
    if process["kind"] == "hawkes":
        meta["branching_ratio"] = branching_ratio(process["alpha"])
    with open(os.path.join(out_dir, "process.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


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
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} +- {sd:.{digits}f}"


def summary_table(records: List[dict]) -> str:
    """Markdown: per dataset and model, mean +- sample std over seeds of the NLL, its gap to
    the true model, the RMSE and the type accuracy; a row for the true model where known."""
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


def summarize(directory: str) -> str:
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        if isinstance(record, dict) and "nll_per_event" in record and "model" in record:
            records.append(record)
    if not records:
        raise FileNotFoundError(f"no event-forecasting records (*.json with nll_per_event) in {directory!r}")
    table = summary_table(records)
    with open(os.path.join(directory, "summary.md"), "w") as f:
        f.write(table + "\n")
    return table


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", help="training sequences (EasyTPP JSON)")
    parser.add_argument("--valid", help="validation sequences (early stopping)")
    parser.add_argument("--test", help="test sequences (the reported metrics)")
    parser.add_argument("--model", choices=MODELS, default="aaren")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the record (a JSON object) here")
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
                        help="print (and write DIR/summary.md) the table of the records in DIR")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.summarize:
        table = summarize(args.summarize)
        print(table)
        return {"table": table}
    if args.generate:
        if not args.out_dir:
            parser.error("--generate needs --out-dir")
        if min(args.sizes) < 1:
            parser.error(f"--sizes must be positive, got {args.sizes}")
        meta = generate(args.generate, args.out_dir, args.seed, args.sizes)
        t = meta["true_test"]
        print(f"{args.generate}: wrote {args.out_dir}/{{train,valid,test}}.json ("
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

    data = {"train": load_events(args.train)}
    dim = data["train"]["num_types"]
    data["valid"] = load_events(args.valid, dim)
    data["test"] = load_events(args.test, dim)
    if args.quick:
        for split, limit in (("train", 64), ("valid", 32), ("test", 32)):
            data[split]["seqs"] = data[split]["seqs"][:limit]
    process = None
    if args.process:
        with open(args.process) as f:
            process = json.load(f)
        if len(process["mu"]) != dim:
            raise EventDataError(f"{args.process}: a process of {len(process['mu'])} types, but "
                                 f"the files have dim_process {dim}")
    dataset = process["name"] if process else os.path.basename(os.path.dirname(os.path.abspath(args.train)))
    print(f"{dataset}: {dim} types; " + ", ".join(
        f"{split} {len(d['seqs'])} sequences / {sum(s['seq_len'] for s in d['seqs'])} events"
        for split, d in data.items()), flush=True)

    record, model = train(args, data)
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
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
