"""examples/event_forecast.py: event forecasting with neural temporal point processes (its data
files, intensity family and simulators: examples/event_data.py).

- bad EasyTPP files are refused naming the sequence (index) and the field;
- the simulators: Hawkes event counts match the stationary rates (I - alpha)^-1 mu and the
  self-correcting process's long-run rates A^-1 mu; the compensator increments between
  events are Exp(1) (time rescaling); the self-correcting sampler's gaps are the closed-form
  inversion in one dimension;
- the true model's exact NLL (closed form) equals a brute-force intensity (a sum over past
  events) integrated numerically; the expected time and type quadrature against closed forms;
- the model's NLL equals a brute-force computation on a tiny case (each prefix encoded on its
  own, the intensity integrated numerically, in the data's time units);
- streaming with `step` equals the parallel pass (log-likelihood terms, expected next
  times, type probabilities), Aaren's state keeping one size;
- a seconds-long run of the script end to end writes the JSON fields.
"""
import copy
import json
import math
import re

import numpy as np
import pytest
import torch

from example_scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ef():
    return load_script("examples/event_forecast.py", "event_forecast_example")


@pytest.fixture(scope="module")
def ed(ef):
    """event_data.py, as the script imports it (one module: its EventDataError is the one the
    script raises)."""
    return load_script("examples/event_data.py", "event_data")


def good_sequences():
    return [
        {"dim_process": 3, "seq_len": 3, "time_since_start": [0.5, 1.0, 2.5],
         "time_since_last_event": [0.5, 0.5, 1.5], "type_event": [0, 2, 1]},
        {"dim_process": 3, "seq_len": 4, "time_since_start": [0.0, 0.25, 0.25, 3.0],
         "time_since_last_event": [0.0, 0.25, 0.0, 2.75], "type_event": [1, 1, 0, 2]},
    ]


# --------------------------------------------------------------------------- data validation


def test_good_file_loads(ed, tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(good_sequences()))
    data = ed.load_events(str(path))
    assert data["num_types"] == 3 and len(data["seqs"]) == 2
    batch = ed.collate(data["seqs"])
    assert batch["times"].shape == (2, 4) and batch["mask"].sum() == 7


def _broken(change):
    seqs = good_sequences()
    change(seqs[1])
    return seqs


BAD = {
    "missing field": (lambda s: s.pop("type_event"), "type_event", "missing"),
    "unsorted times": (lambda s: s.update(time_since_start=[0.0, 0.25, 0.2, 3.0]),
                       "time_since_start", "not sorted: event 2"),
    "negative gap": (lambda s: s.update(time_since_last_event=[-0.1, 0.25, 0.0, 2.75]),
                     "time_since_last_event", "negative gap -0.1 at event 0"),
    "type out of range": (lambda s: s.update(type_event=[1, 3, 0, 2]),
                          "type_event", r"type 3, outside 0\.\.2"),
    "negative type": (lambda s: s.update(type_event=[1, -1, 0, 2]), "type_event", "outside"),
    "empty sequence": (lambda s: s.update(seq_len=0, time_since_start=[], time_since_last_event=[],
                                          type_event=[]), "type_event", "empty"),
    "seq_len inconsistent": (lambda s: s.update(seq_len=5), "time_since_start",
                             "4 entries, but seq_len is 5"),
    "list shorter": (lambda s: s.update(type_event=[1, 1, 0]), "type_event", "3 entries"),
    "gap not the difference": (lambda s: s.update(time_since_last_event=[0.0, 0.25, 0.5, 2.75]),
                               "time_since_last_event", "0.5 at event 2"),
    "dim_process differs": (lambda s: s.update(dim_process=4), "dim_process", "earlier sequences"),
    "time not a number": (lambda s: s.update(time_since_start=[0.0, "x", 0.25, 3.0]),
                          "time_since_start", "not a finite number"),
    "time not finite": (lambda s: s.update(time_since_start=[0.0, 0.25, 0.25, float("nan")]),
                        "time_since_start", "not a finite number"),
    "type not an integer": (lambda s: s.update(type_event=[1, 1.0, 0, 2]), "type_event",
                            "not an integer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sequence_names_index_and_field(ed, case):
    change, field, detail = BAD[case]
    with pytest.raises(ed.EventDataError, match=rf"f\.json: sequence 1, field '{field}'.*{detail}"):
        ed.check_sequences(_broken(change), "f.json")


def test_bad_files(ed, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ed.EventDataError, match="not valid JSON"):
        ed.load_events(str(path))
    path.write_text(json.dumps({"seqs": []}))
    with pytest.raises(ed.EventDataError, match="expected a JSON list"):
        ed.load_events(str(path))
    path.write_text("[]")
    with pytest.raises(ed.EventDataError, match="no sequences"):
        ed.load_events(str(path))
    path.write_text(json.dumps([good_sequences()[0], [1, 2]]))
    with pytest.raises(ed.EventDataError, match="sequence 1 is a list"):
        ed.load_events(str(path))
    with pytest.raises(FileNotFoundError, match="--generate"):
        ed.load_events(str(tmp_path / "absent.json"))
    # the validation and test files must have the training file's number of types
    path.write_text(json.dumps(good_sequences()))
    with pytest.raises(ed.EventDataError, match="sequence 0, field 'dim_process': 3, but the model has 5"):
        ed.load_events(str(path), num_types=5)


def test_script_refuses_bad_file(ef, ed, tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(good_sequences()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_broken(BAD["unsorted times"][0])))
    # the script ends with the message and exit status 2 (argparse's), not a traceback
    with pytest.raises(SystemExit) as exit_info:
        ef.main(["--train", str(good), "--valid", str(good), "--test", str(bad), "--quick"])
    assert exit_info.value.code == 2
    assert re.search(r"bad\.json: sequence 1, field 'time_since_start'", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        ef.main(["--train", str(tmp_path / "sub" / ".." / "absent.json"), "--valid", str(good),
                 "--test", str(good), "--quick"])
    err = capsys.readouterr().err
    assert f"event file not found: {tmp_path / 'absent.json'}" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        ef.main(["--train", str(good), "--valid", str(good), "--test", str(good), "--quick",
                 "--process", str(tmp_path / "process.json")])
    assert "process file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ef.main(["--train", str(good), "--valid", str(good), "--test", str(good), "--quick",
                 "--process", str(good)])
    assert "not a process.json of --generate" in capsys.readouterr().err
    # the library function still raises
    with pytest.raises(FileNotFoundError, match="process file not found"):
        ef.load_process(str(tmp_path / "process.json"), 3)


# --------------------------------------------------------------------------- simulators


@pytest.mark.parametrize("name", ["hawkes2", "hawkes5", "selfcorrect2"])
def test_long_run_rates(ed, name):
    """Counts per type over [0, T] / T: the stationary rates (I - alpha)^-1 mu of a Hawkes
    process (within 5%: the start from an empty history costs about 1% at T = 200), and
    A^-1 mu for the self-correcting process (mu_k t - (A N)_k stays bounded: within 2%)."""
    process = ed.PROCESSES[name]
    horizon = 200.0
    out = ed.simulate(process, [10 ** 9] * 150, np.random.default_rng(1), max_time=horizon)
    k = len(process["mu"])
    counts = np.array([[np.sum(types == j) for j in range(k)] for _, types in out])
    rates = counts.mean(0) / horizon
    expected = ed.stationary_rates(process)
    tol = 0.05 if process["kind"] == "hawkes" else 0.02
    np.testing.assert_allclose(rates, expected, rtol=tol)
    for times, _ in out:
        assert (np.diff(times) >= 0).all() and times.max() <= horizon


@pytest.mark.parametrize("name", ["hawkes2", "hawkes5", "selfcorrect2"])
def test_time_rescaling(ed, name):
    """Under the true intensity the compensator between consecutive events is Exp(1), i.i.d.
    (time-rescaling theorem), and each type's share of the events at which it happened is
    lambda_k / lambda there: mean and Kolmogorov-Smirnov distance."""
    process = ed.PROCESSES[name]
    rng = np.random.default_rng(2)
    out = ed.simulate(process, [60] * 100, rng)
    increments, probs, types = [], [], []
    for times, k in out:
        assert len(times) == 60
        la, b = ed.true_intensity_params(process, torch.tensor(times), torch.tensor(k))
        tau = torch.tensor(np.diff(times))
        increments.append(ed.compensator(la[:-1], b[:-1], tau))
        lam = ed.log_intensity(la[:-1], b[:-1], tau).exp()
        probs.append(lam / lam.sum(-1, keepdim=True))
        types.append(torch.tensor(k[1:]))
    x = torch.cat(increments).sort().values.numpy()
    n = len(x)
    assert abs(x.mean() - 1) < 4 / math.sqrt(n)
    ks = np.max(np.abs(np.arange(1, n + 1) / n - (1 - np.exp(-x))))
    assert ks < 1.63 / math.sqrt(n)           # the 1% critical value
    probs, types = torch.cat(probs), torch.cat(types)
    for j in range(probs.size(1)):            # expected count of type j vs the count
        expected = float(probs[:, j].sum())
        assert abs(int((types == j).sum()) - expected) < 4 * math.sqrt(expected)


def test_self_correcting_gap_is_the_inversion(ed):
    """One type: lambda(t) = exp(mu t - a N); from t0 with N events the gap solving
    compensator = E is log(1 + mu E exp(-(mu t0 - a N))) / mu; the sampler draws E from
    the same stream (exponential, then uniform for the type)."""
    process = {"kind": "selfcorrecting", "mu": [0.8], "A": [[1.3]]}
    (times, types), = ed.simulate(process, [25], np.random.default_rng(3))
    rng = np.random.default_rng(3)
    now = 0.0
    for n, t in enumerate(times):
        e = rng.exponential(size=1)[0]
        rng.uniform(size=(1, 1))
        c = 0.8 * now - 1.3 * n
        now = now + math.log1p(0.8 * e * math.exp(-c)) / 0.8
        assert t == pytest.approx(now, rel=1e-10)
    assert (types == 0).all()


def brute_force_intensity(process, times, types, t):
    """lambda_k(t) [K] from the definition: a sum over the events before t."""
    mu = np.asarray(process["mu"])
    before = times < t
    if process["kind"] == "hawkes":
        alpha, beta = np.asarray(process["alpha"]), np.asarray(process["beta"])
        lam = mu.copy()
        for s, j in zip(times[before], types[before]):
            lam += alpha[:, j] * beta[:, j] * np.exp(-beta[:, j] * (t - s))
        return lam
    counts = np.bincount(types[before], minlength=len(mu))
    return np.exp(mu * t - np.asarray(process["A"]) @ counts)


@pytest.mark.parametrize("name", ["hawkes2", "hawkes5", "selfcorrect2"])
def test_exact_nll_against_numeric_integral(ed, name):
    process = ed.PROCESSES[name]
    (times, types), = ed.simulate(process, [12], np.random.default_rng(4))
    seq = ed.to_easytpp(times, types, len(process["mu"]))
    exact = ed.true_metrics(process, [seq], predictions=False)
    nodes, weights = np.polynomial.legendre.leggauss(60)
    total = 0.0
    for i in range(1, len(times)):
        a, b = times[i - 1], times[i]
        # the intensity just after event i-1 counts it: evaluate strictly inside (a, b]
        s = (b - a) / 2 * nodes + (a + b) / 2
        integral = (b - a) / 2 * sum(w * brute_force_intensity(process, times, types, x).sum()
                                     for w, x in zip(weights, s))
        lam = brute_force_intensity(process, times, types, b)   # events before b (ties: none)
        total += math.log(lam[types[i]]) - integral
    assert exact["scored_events"] == len(times) - 1
    assert exact["nll_per_event"] == pytest.approx(-total / (len(times) - 1), rel=1e-10, abs=1e-10)


def test_prediction_quadrature(ed):
    """Constant rates: E[tau] = 1 / lambda, P(k) = lambda_k / lambda. A Hawkes-like decay:
    against a fine numeric integral of S and lambda_k S."""
    rates = torch.tensor([[0.3, 1.2, 0.5], [2.0, 0.01, 0.1]], dtype=torch.float64)
    la, b = rates.log()[..., None], torch.zeros(2, 3, 1, dtype=torch.float64)
    e_tau, p = ed.predict_next(la, b)
    torch.testing.assert_close(e_tau, 1 / rates.sum(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(p, rates / rates.sum(1, keepdim=True), rtol=1e-9, atol=0)

    la = torch.tensor([[[math.log(0.2), math.log(3.0)], [math.log(0.1), math.log(0.5)]]],
                      dtype=torch.float64)
    b = torch.tensor([[[0.0, -4.0], [0.3, -0.7]]], dtype=torch.float64)
    e_tau, p = ed.predict_next(la, b)
    s = torch.linspace(0, 30, 300001, dtype=torch.float64)   # the compensator reaches ~1e4
    lam = (la[0, None] + b[0, None] * s[:, None, None]).exp().sum(-1)        # [G, K]
    cum = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumulative_trapezoid(lam.sum(1), s)])
    torch.testing.assert_close(cum[-1:], ed.compensator(la, b, s[-1:]), rtol=1e-8, atol=0)
    surv = torch.exp(-cum)
    torch.testing.assert_close(e_tau, torch.trapezoid(surv, s)[None], rtol=1e-7, atol=0)
    torch.testing.assert_close(p[0], torch.trapezoid(lam * surv[:, None], s, dim=0),
                               rtol=1e-7, atol=1e-9)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-7)


def test_log_phi_and_compensator_gradients(ed):
    """The closed-form compensator is finite with finite gradients at b = 0, tiny |b s| and
    large b s, and equals the direct formula a (exp(b s) - 1) / b."""
    b = torch.tensor([0.0, 1e-9, -1e-9, 1e-3, -2.0, 15.0, -50.0], dtype=torch.float64,
                     requires_grad=True)
    la = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    s = torch.full((7,), 3.0, dtype=torch.float64)
    cum = ed.compensator(la[:, None, None], b[:, None, None], s)
    direct = torch.where(b.abs() < 1e-12, s, torch.expm1(b * s) / torch.where(b == 0, 1.0, b))
    torch.testing.assert_close(cum, direct.detach(), rtol=1e-12, atol=0)
    cum.sum().backward()
    assert torch.isfinite(b.grad).all() and torch.isfinite(la.grad).all()
    zero = ed.compensator(la[:, None, None], b[:, None, None], torch.zeros(7, dtype=torch.float64))
    assert (zero == 0).all()


# --------------------------------------------------------------------------- the model


def tiny_sequences(ed, n=6, k=3):
    process = {"kind": "hawkes", "mu": [0.4] * k,
               "alpha": (0.2 * np.eye(k) + 0.05).tolist(), "beta": [[1.0, 3.0, 0.5][:k]] * k}
    out = ed.simulate(process, [n] * 4, np.random.default_rng(5))
    return [ed.to_easytpp(t, y, k) for t, y in out]


@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_model_nll_against_brute_force(ef, ed, kind):
    """Every event's log-likelihood term from the parallel pass equals: encode the prefix
    of the events before it on its own, take the last output's intensity, convert it to the
    data's time units (lambda(t) / c), integrate it numerically over the gap."""
    torch.manual_seed(0)
    model = ef.EventModel(kind, 3, d_model=8, nhead=2, num_layers=2, d_ff=16, dropout=0.0,
                          components=3, time_scale=0.7).double().eval()
    seqs = tiny_sequences(ed)
    terms, mask, _ = ef.sequence_log_likelihood(model, ed.collate(seqs))
    nodes, weights = np.polynomial.legendre.leggauss(80)
    nodes, weights = torch.tensor(nodes), torch.tensor(weights)
    for row, seq in enumerate(seqs):
        times = torch.tensor(seq["time_since_start"], dtype=torch.float64)
        gaps = torch.tensor(seq["time_since_last_event"], dtype=torch.float64)
        types = torch.tensor(seq["type_event"])
        for i in range(1, len(times)):
            with torch.no_grad():
                h = model(types[None, :i], times[None, :i], gaps[None, :i])[0, -1]
                la, b = model.intensity(h)
            tau = float(times[i] - times[i - 1])

            def lam(t):  # [len(t), K], t in data units since event i-1
                return ((la + b * (t[:, None, None] / 0.7)).exp().sum(-1)) / 0.7

            t = tau / 2 * nodes + tau / 2
            integral = tau / 2 * (weights[:, None] * lam(t)).sum()
            expected = torch.log(lam(torch.tensor([tau], dtype=torch.float64))[0, types[i]]) - integral
            assert bool(mask[row, i - 1])
            torch.testing.assert_close(terms[row, i - 1], expected, rtol=1e-12, atol=1e-12)
    assert int(mask.sum()) == sum(s["seq_len"] - 1 for s in seqs)


@pytest.mark.parametrize("kind", ["aaren", "transformer"])
def test_streaming_equals_parallel(ef, ed, kind):
    """A briefly trained model (float32) scores each sequence one event at a time with the
    stack's `step`; every log-likelihood term, expected next time and type probability equals
    the parallel pass within float32 tolerance. Aaren's state has one size throughout."""
    torch.manual_seed(0)
    seqs = tiny_sequences(ed, n=30)
    model = ef.EventModel(kind, 3, d_model=16, nhead=4, num_layers=2, d_ff=32, dropout=0.1,
                          components=4, time_scale=ef.mean_gap(seqs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = ed.collate(seqs)
    first = None
    for _ in range(15):
        terms, mask, _ = ef.sequence_log_likelihood(model, batch)
        loss = -terms.sum() / mask.sum()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    for seq in seqs:
        stream, parallel = ef.stream_sequence(model, seq), ef.parallel_sequence(model, seq)
        assert len(stream["terms"]) == seq["seq_len"] - 1
        for key in ("terms", "next_time", "probs"):
            torch.testing.assert_close(stream[key], parallel[key], rtol=1e-4, atol=1e-4)
        sizes = stream["state_bytes"]
        if kind == "aaren":
            assert len(set(sizes)) == 1     # 2 layers x 4 heads x (1 + 4) float64
            assert sizes[0] == 2 * 4 * (1 + 4) * 8
        else:
            assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    check = ef.stream_check(model, seqs[:2])
    assert check["max_abs_diff_log_likelihood"] < 1e-4


def test_true_process_in_the_model_family(ef, ed):
    """The true intensities have the head's form, with the script's default M = 6
    components: Hawkes b = 0 (the baseline) and -beta (the excitations, at most 5 distinct
    decays), self-correcting b = mu > 0 on one component, within the head's range of rates
    (in 1/c, c the mean gap, about 1 here)."""
    for name, process in ed.PROCESSES.items():
        (times, types), = ed.simulate(process, [8], np.random.default_rng(6))
        la, b = ed.true_intensity_params(process, torch.tensor(times), torch.tensor(types))
        if process["kind"] == "hawkes":
            assert (b[..., 0] == 0).all() and (b[..., 1:] < 0).all()
            assert 1 + len(np.unique(process["beta"])) <= 6
            assert -b.min() < ef.DECAY_MAX / 2
        else:
            assert b.shape[-1] == 1 and (b > 0).all() and (b < ef.GROWTH_MAX / 2).all()
        assert torch.isfinite(ed.log_likelihood_terms(
            la[:-1], b[:-1], torch.tensor(np.diff(times)), torch.tensor(types[1:]))).all()


# --------------------------------------------------------------------------- the script


def test_generate_and_quick_run(ef, ed, tmp_path):
    pytest.importorskip("tqdm")
    meta = ef.main(["--generate", "hawkes2", "--out-dir", str(tmp_path), "--seed", "3",
                    "--sizes", "40", "12", "12"])
    assert meta["splits"]["train"]["sequences"] == 40
    truth = json.loads((tmp_path / "process.json").read_text())
    assert truth["true_test"]["nll_per_event"] == pytest.approx(meta["true_test"]["nll_per_event"])
    train = json.loads((tmp_path / "train.json").read_text())
    assert set(train[0]) == set(ed.FIELDS) and 30 <= train[0]["seq_len"] <= 70
    again = ef.main(["--generate", "hawkes2", "--out-dir", str(tmp_path / "again"), "--seed", "3",
                     "--sizes", "40", "12", "12"])
    assert json.loads((tmp_path / "again" / "train.json").read_text()) == train   # the seed fixes it
    assert again["true_test"] == meta["true_test"]

    out = tmp_path / "record.json"
    args = ["--train", str(tmp_path / "train.json"), "--valid", str(tmp_path / "valid.json"),
            "--test", str(tmp_path / "test.json"), "--model", "aaren", "--seed", "1",
            "--json", str(out), "--quick", "--process", str(tmp_path / "process.json")]
    ef.main(args)
    record = json.loads(out.read_text())
    for key in ("nll_per_event", "scored_events", "rmse_next_time", "type_accuracy", "model", "seed",
                "epochs_run", "train_seconds", "params", "gap_to_true_nll", "true", "stream_check"):
        assert key in record, key
    assert record["model"] == "aaren" and record["seed"] == 1 and record["dataset"] == "hawkes2"
    test = json.loads((tmp_path / "test.json").read_text())
    assert record["scored_events"] == sum(s["seq_len"] - 1 for s in test[:32])
    for key in ("nll_per_event", "rmse_next_time", "gap_to_true_nll"):
        assert math.isfinite(record[key])
    assert 0 <= record["type_accuracy"] <= 1
    assert record["gap_to_true_nll"] == pytest.approx(record["nll_per_event"]
                                                      - record["true"]["nll_per_event"])
    assert record["stream_check"]["max_abs_diff_log_likelihood"] < 1e-4
    assert record["stream_check"]["state_bytes_min"] == record["stream_check"]["state_bytes_max"]

    copy_record = copy.deepcopy(record)
    copy_record.update(model="transformer")
    (tmp_path / "record_t.json").write_text(json.dumps(copy_record))
    table = ef.main(["--summarize", str(tmp_path)])["table"]
    assert "| hawkes2 | aaren | 1 |" in table and "| hawkes2 | transformer | 1 |" in table
    assert "true process" in table and (tmp_path / "summary.md").exists()
    # one record file: its table, printed only (no summary.md beside it)
    (tmp_path / "summary.md").unlink()
    one = ef.main(["--summarize", str(out)])["table"]
    assert "| hawkes2 | aaren | 1 |" in one and "transformer" not in one
    assert not (tmp_path / "summary.md").exists()


def test_summarize_errors(ef, tmp_path, capsys):
    (tmp_path / "notes.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(FileNotFoundError, match="holds no event-forecasting records"):
        ef.summarize(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is no event-forecasting record"):
        ef.summarize(str(tmp_path / "notes.json"))
    with pytest.raises(SystemExit) as exit_info:
        ef.main(["--summarize", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not found: --summarize takes a folder of records" in err and "Traceback" not in err


def test_summary_std_only_with_two_seeds(ef):
    """A single seed's row shows the means alone (no "+- 0.0000"); two seeds' the sample std."""
    def record(model, seed, nll):
        return {"dataset": "hawkes2", "model": model, "seed": seed, "nll_per_event": nll,
                "gap_to_true_nll": nll - 1.0, "rmse_next_time": 1.5, "type_accuracy": 0.6,
                "params": 1000, "train_seconds": 10.0}
    table = ef.summary_table([record("aaren", 0, 1.25), record("transformer", 0, 1.25),
                              record("transformer", 1, 1.75)])
    aaren_row, transformer_row = [line for line in table.splitlines() if "| hawkes2 |" in line]
    assert aaren_row.startswith("| hawkes2 | aaren | 1 | 1.2500 | 0.2500 | 1.5000 | 60.00 |")
    assert "+-" not in aaren_row
    assert "| 1.5000 +- 0.3536 | 0.5000 +- 0.3536 | 1.5000 +- 0.0000 |" in transformer_row


def test_script_argument_errors(ef, capsys):
    with pytest.raises(SystemExit):
        ef.main(["--train", "a.json"])
    assert "--valid, --test" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ef.main(["--generate", "hawkes2"])
    assert "--out-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ef.main(["--train", "a", "--valid", "b", "--test", "c", "--model", "lstm"])
    assert "invalid choice" in capsys.readouterr().err
