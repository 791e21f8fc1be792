"""The data side of examples/event_forecast.py: EasyTPP event files (checked before use), the
intensity family (la, b) that the model's head and the true processes share (exact
log-likelihood, quadrature for the next time and type), and the synthetic processes with
known parameters (hawkes2, hawkes5, selfcorrect2: samplers, true intensities and metrics,
and the files that `event_forecast.py --generate` writes). event_forecast.py's docstring
describes the model, the data layout and the processes.
"""
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FIELDS = ("dim_process", "seq_len", "time_since_start", "time_since_last_event", "type_event")
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
        raise FileNotFoundError(f"event file not found: {os.path.normpath(path)} (make one with "
                                f"--generate)")
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
