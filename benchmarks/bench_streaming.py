"""Efficiency: an Aaren stack vs a Transformer stack with a KV cache, as in the paper.

Both stacks have the same width, depth, heads and (to within 0.1%) parameter count (see
`aaren.baselines.build_stacks`; default E=64, 2 layers, 4 heads, float32), and both are causal. This
script measures, side by side in one run:

Streaming (inference, one token at a time, `torch.inference_mode`, batch 1):
  - memory held by the model's inference state vs tokens seen: Aaren's per-layer states
    (lse [B, H], out [B, H, head_dim]) and the Transformer's per-layer K and V caches, as
    sum(numel * element_size) of the state tensors; the Transformer's cache is
    preallocated and doubles its capacity when full (what is allocated is reported too);
  - process memory: the resident set size at each sample point (/proc/self/statm) and the
    process peak (getrusage ru_maxrss, or the largest RSS seen if higher: the kernel
    updates ru_maxrss lazily). Each model streams in its own child process, so these
    numbers are that model's alone; the two children take turns every 256 tokens, so
    both are timed under the same machine load. (CUDA: torch.cuda.memory_allocated and
    max_memory_allocated instead.)
  - per-token latency (time.perf_counter around each `step`, after a CUDA synchronize on
    the GPU; reported as the median over a window of the last ~n/16 tokens before each
    log-spaced sample point n) and cumulative time vs tokens seen;
  - the per-token latency of the same Transformer when the cache grows by `torch.cat`
    (how users commonly write it) is probed at the sample points with a cache of that
    length (a few steps each, in a third child process).

Parallel (training): forward + backward time of the whole stack vs sequence length, for
both, alternating per length (Aaren: the parallel scan; Transformer:
scaled_dot_product_attention(is_causal=True)).

Outputs (in --out, default benchmarks/results): streaming_<device>.csv,
parallel_<device>.csv, streaming_<device>.png, parallel_<device>.png, and a summary table
on stdout. Runs on the CPU, and on the GPU too where one is present (--device).

    python benchmarks/bench_streaming.py                  # 65 536 tokens: several minutes
    python benchmarks/bench_streaming.py --quick          # 2 048 tokens, small parallel grid
    python benchmarks/bench_streaming.py --tokens 262144 --device cuda
"""
import argparse
import array
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

from aaren.baselines import build_stacks, state_bytes  # the two stacks compared

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --------------------------------------------------------------------------- measuring


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return -1


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def sample_points(tokens: int) -> List[int]:
    """1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5 times them) up to `tokens`, and it."""
    points, p = set(), 1
    while p <= tokens:
        points.add(p)
        if p + p // 2 <= tokens and p >= 2:
            points.add(p + p // 2)
        p *= 2
    points.add(tokens)
    return sorted(points)


def window(n: int) -> int:
    """How many of the last tokens before sample point n the latency median is over."""
    return min(n, max(8, min(1024, n // 16)))


def _progress(total: int, desc: str, enabled: bool, unit: str = "tok"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "tok", disable=not enabled,
                file=sys.stderr, mininterval=0.5, smoothing=0.1)


CHUNK = 256  # tokens between hand-overs when the two models stream in lockstep


def stream_chunks(model_name: str, tokens: int, d_model: int, nhead: int, num_layers: int,
                  device: str = "cpu", seed: int = 0, cache_mode: str = "prealloc",
                  chunk: int = CHUNK):
    """Generator: streams `tokens` random tokens one at a time through one stack, yielding
    the number of tokens done after every `chunk` tokens (so that a driver can alternate
    two models), and returning (StopIteration.value) per sample point: tokens, state bytes
    (used, allocated), RSS, peak RSS, median per-token latency over a window, cumulative
    seconds."""
    torch.manual_seed(seed)
    aaren_stack, transformer, _ = build_stacks(d_model, nhead, num_layers)
    model = (aaren_stack if model_name == "aaren" else transformer).to(device).eval()
    del aaren_stack, transformer
    cuda = device.startswith("cuda")

    def new_state():
        return None if model_name == "aaren" else model.new_state(cache_mode)

    points = set(sample_points(tokens))
    times = array.array("d", [0.0]) * tokens  # allocated and written now: RSS stays put
    rows: Dict[str, list] = {k: [] for k in ("tokens", "state_bytes", "state_allocated_bytes",
                                            "rss_bytes", "peak_rss_bytes", "latency_s",
                                            "cumulative_s")}
    with torch.inference_mode():
        xs = torch.randn(chunk, 1, d_model, device=device)
        state = new_state()  # warm up: code paths, allocator, caches
        for i in range(32):
            _, state = model.step(xs[i % chunk], state)
        state = new_state()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cumulative = 0.0
        for t in range(tokens):
            if t % chunk == 0 and t:
                yield t
                xs = torch.randn(chunk, 1, d_model, device=device)
            x = xs[t % chunk]
            start = time.perf_counter()
            _, state = model.step(x, state)
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            times[t] = elapsed
            cumulative += elapsed
            n = t + 1
            if n in points:
                used, allocated = state_bytes(state)
                rows["tokens"].append(n)
                rows["state_bytes"].append(used)
                rows["state_allocated_bytes"].append(allocated)
                if cuda:
                    rows["rss_bytes"].append(torch.cuda.memory_allocated())
                    rows["peak_rss_bytes"].append(torch.cuda.max_memory_allocated())
                else:
                    rss = _rss_bytes()
                    # ru_maxrss is updated lazily by the kernel: never report it below an RSS seen
                    peak = max([_peak_rss_bytes(), rss] + rows["peak_rss_bytes"][-1:])
                    rows["rss_bytes"].append(rss)
                    rows["peak_rss_bytes"].append(peak)
                rows["latency_s"].append(statistics.median(times[n - window(n):n]))
                rows["cumulative_s"].append(cumulative)
    return rows


def stream(model_name: str, tokens: int, d_model: int, nhead: int, num_layers: int,
           device: str = "cpu", seed: int = 0, progress: bool = True,
           cache_mode: str = "prealloc") -> Dict[str, list]:
    """`stream_chunks` run to the end, alone (see `stream_lockstep` for two side by side)."""
    return stream_lockstep([model_name], tokens, d_model, nhead, num_layers, device, seed,
                           progress, cache_mode)[model_name]


def stream_lockstep(models: List[str], tokens: int, d_model: int, nhead: int, num_layers: int,
                    device: str = "cpu", seed: int = 0, progress: bool = True,
                    cache_mode: str = "prealloc") -> Dict[str, Dict[str, list]]:
    """Streams the models in this process, alternating every CHUNK tokens."""
    gens = {m: stream_chunks(m, tokens, d_model, nhead, num_layers, device, seed, cache_mode)
            for m in models}
    results: Dict[str, Dict[str, list]] = {}
    bar = _progress(tokens, f"{' + '.join(models)} streaming ({device})", progress)
    while len(results) < len(gens):
        for m, gen in gens.items():
            if m not in results:
                try:
                    next(gen)
                except StopIteration as stop:
                    results[m] = stop.value
        bar.update(min(tokens, bar.n + CHUNK) - bar.n)
    bar.close()
    return results


def probe_cat(tokens: int, d_model: int, nhead: int, num_layers: int, device: str = "cpu",
              seed: int = 0, steps: int = 5, progress: bool = True) -> Dict[str, list]:
    """Per-token latency of the Transformer whose caches grow by torch.cat, at each sample
    point n: caches of n random tokens, then `steps` timed steps (median)."""
    torch.manual_seed(seed)
    _, model, _ = build_stacks(d_model, nhead, num_layers)
    model = model.to(device).eval()
    hd = d_model // nhead
    rows: Dict[str, list] = {"tokens": [], "latency_s": []}
    points = [n for n in sample_points(tokens) if n > 1]
    with torch.inference_mode():
        x = torch.randn(1, d_model, device=device)
        bar = _progress(len(points), f"transformer cat-cache probe ({device})", progress,
                    unit="point")
        for n in points:
            caches = model.new_state("cat")
            for cache in caches:
                cache.append(torch.randn(1, nhead, n - 1, hd, device=device),
                             torch.randn(1, nhead, n - 1, hd, device=device))
            times = []
            for _ in range(steps):
                # each timed step goes from n - 1 to n cached tokens
                for cache in caches:
                    cache.k, cache.v = cache.k[:, :, :n - 1], cache.v[:, :, :n - 1]
                    cache.length = n - 1
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model.step(x, caches)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            rows["tokens"].append(n)
            rows["latency_s"].append(statistics.median(times))
            bar.update(1)
        bar.close()
    return rows


def parallel(lengths: List[int], d_model: int, nhead: int, num_layers: int,
             device: str = "cpu", seed: int = 0, budget_s: float = 2.0, max_repeats: int = 5,
             progress: bool = True) -> Dict[str, list]:
    """Forward + backward seconds of each stack on one sequence of each length (batch 1),
    alternating the two models per length; median of up to `max_repeats` runs (fewer when
    one takes more than budget_s / max_repeats) after one warm-up run, or the warm-up run
    alone when it took more than 4 * budget_s."""
    torch.manual_seed(seed)
    models = dict(zip(("aaren", "transformer"), build_stacks(d_model, nhead, num_layers)[:2]))
    for m in models.values():
        m.to(device).train()
    rows: Dict[str, list] = {"model": [], "N": [], "fwd_bwd_s": []}
    cuda = device.startswith("cuda")
    bar = _progress(len(lengths) * 2, f"parallel fwd+bwd ({device})", progress, unit="run")
    for n in lengths:
        x = torch.randn(1, n, d_model, device=device)
        for name, model in models.items():
            def run():
                model.zero_grad(set_to_none=True)
                model(x).square().mean().backward()
                if cuda:
                    torch.cuda.synchronize()
            start = time.perf_counter()
            run()  # warm-up
            first = time.perf_counter() - start
            repeats = max(1, min(max_repeats, int(budget_s / max(first, 1e-9))))
            times = []
            if first > 4 * budget_s:  # seconds per run: warm-up effects are negligible
                repeats, times = 0, [first]
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            rows["model"].append(name)
            rows["N"].append(n)
            rows["fwd_bwd_s"].append(statistics.median(times))
            bar.update(1)
    bar.close()
    return rows


# --------------------------------------------------------------------------- reporting


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.1f} s")


def summary_points(tokens: int) -> List[int]:
    points = [p for p in (1024, 8192, 65536) if p <= tokens]
    if tokens not in points:
        points.append(tokens)
    return points


def summarize(results: dict) -> str:
    """Markdown tables: streaming at 1k, 8k, 64k tokens (and the last), and parallel."""
    a, t, cat = results["aaren"], results["transformer"], results.get("transformer_cat")
    lines = [f"Streaming on {results['device']} ({results['threads']} thread(s)), batch 1, "
             f"E={results['info']['d_model']}, {results['info']['num_layers']} layers, "
             f"{results['info']['nhead']} heads, float32",
             "",
             "| tokens | Aaren state | KV cache | ratio | Aaren ms/token | Transformer ms/token "
             "| ratio | Transformer (torch.cat cache) ms/token |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in summary_points(results["tokens"]):
        ia, it = a["tokens"].index(n), t["tokens"].index(n)
        sa, st = a["state_bytes"][ia], t["state_bytes"][it]
        la, lt = a["latency_s"][ia], t["latency_s"][it]
        lc = "-"
        if cat is not None and n in cat["tokens"]:
            lc = f"{cat['latency_s'][cat['tokens'].index(n)] * 1e3:.3f}"
        lines.append(f"| {n:,} | {_fmt_bytes(sa)} | {_fmt_bytes(st)} | {st / sa:,.0f}x "
                     f"| {la * 1e3:.3f} | {lt * 1e3:.3f} | {lt / la:.1f}x | {lc} |")
    mem = "GPU memory allocated" if results["device"].startswith("cuda") else "process RSS"
    peak = "GPU peak allocated" if results["device"].startswith("cuda") else "process peak RSS"
    lines += ["",
              f"| after {results['tokens']:,} tokens | {mem} | {peak} | total time |",
              "|---|---:|---:|---:|"]
    for name, r in (("Aaren", a), ("Transformer + KV cache", t)):
        lines.append(f"| {name} | {_fmt_bytes(r['rss_bytes'][-1])} | "
                     f"{_fmt_bytes(r['peak_rss_bytes'][-1])} | {_fmt_time(r['cumulative_s'][-1])} |")
    p = results.get("parallel")
    if p:
        lines += ["", "Parallel (training): forward + backward of the stack, batch 1",
                  "", "| N | Aaren | Transformer (SDPA, is_causal) | ratio |", "|---:|---:|---:|---:|"]
        by = {(m, n): s for m, n, s in zip(p["model"], p["N"], p["fwd_bwd_s"])}
        for n in sorted(set(p["N"])):
            sa, st = by[("aaren", n)], by[("transformer", n)]
            lines.append(f"| {n:,} | {_fmt_time(sa)} | {_fmt_time(st)} | {st / sa:.1f}x |")
    return "\n".join(lines)


def write_csv(results: dict, out_dir: str) -> List[str]:
    dev = results["device"].split(":")[0]
    paths = [os.path.join(out_dir, f"streaming_{dev}.csv")]
    with open(paths[0], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "tokens", "state_bytes", "state_allocated_bytes",
                    "rss_bytes" if dev == "cpu" else "gpu_allocated_bytes",
                    "peak_rss_bytes" if dev == "cpu" else "gpu_peak_allocated_bytes",
                    "latency_ms", "cumulative_s"])
        for name in ("aaren", "transformer"):
            r = results[name]
            for i in range(len(r["tokens"])):
                w.writerow([name, r["tokens"][i], r["state_bytes"][i],
                            r["state_allocated_bytes"][i], r["rss_bytes"][i],
                            r["peak_rss_bytes"][i], f"{r['latency_s'][i] * 1e3:.6f}",
                            f"{r['cumulative_s'][i]:.6f}"])
        cat = results.get("transformer_cat")
        if cat:
            for n, s in zip(cat["tokens"], cat["latency_s"]):
                w.writerow(["transformer_cat", n, "", "", "", "", f"{s * 1e3:.6f}", ""])
    p = results.get("parallel")
    if p:
        paths.append(os.path.join(out_dir, f"parallel_{dev}.csv"))
        with open(paths[-1], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "N", "fwd_bwd_ms"])
            for m, n, s in zip(p["model"], p["N"], p["fwd_bwd_s"]):
                w.writerow([m, n, f"{s * 1e3:.4f}"])
    return paths


def plot(results: dict, out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dev = results["device"].split(":")[0]
    a, t, cat = results["aaren"], results["transformer"], results.get("transformer_cat")
    style = {"aaren": dict(color="tab:blue", label="Aaren (aaren.AarenEncoder.step)"),
             "transformer": dict(color="tab:red", label="Transformer + KV cache (preallocated)"),
             "cat": dict(color="tab:orange", ls="--", label="Transformer + KV cache (torch.cat), probed")}
    info = results["info"]
    title = (f"{dev.upper()}: E={info['d_model']}, {info['num_layers']} layers, "
             f"{info['nhead']} heads, batch 1, float32; params Aaren {info['params_aaren']:,} / "
             f"Transformer {info['params_transformer']:,}")
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    mib = 2.0 ** 20
    ax[0, 0].loglog(a["tokens"], [b for b in a["state_bytes"]], **style["aaren"])
    ax[0, 0].loglog(t["tokens"], [b for b in t["state_bytes"]], **style["transformer"])
    ax[0, 0].loglog(t["tokens"], t["state_allocated_bytes"], color="tab:red", ls=":",
                    label="KV cache allocated (capacity)")
    ax[0, 0].set(title="inference state (bytes)", xlabel="tokens seen", ylabel="bytes")
    mem_label = "GPU memory allocated (MiB)" if dev == "cuda" else "process memory (MiB)"
    for name, r in (("aaren", a), ("transformer", t)):
        ax[0, 1].semilogx(r["tokens"], [b / mib for b in r["rss_bytes"]], **style[name])
        ax[0, 1].semilogx(r["tokens"], [b / mib for b in r["peak_rss_bytes"]], ls=":",
                          color=style[name]["color"], label=f"{name} peak")
    ax[0, 1].set(title=mem_label + (": RSS and peak RSS" if dev == "cpu" else ""),
                 xlabel="tokens seen", ylabel="MiB")
    ax[1, 0].loglog(a["tokens"], [s * 1e3 for s in a["latency_s"]], **style["aaren"])
    ax[1, 0].loglog(t["tokens"], [s * 1e3 for s in t["latency_s"]], **style["transformer"])
    if cat:
        ax[1, 0].loglog(cat["tokens"], [s * 1e3 for s in cat["latency_s"]], **style["cat"])
    ax[1, 0].set(title="per-token latency (median over a window)", xlabel="tokens seen",
                 ylabel="ms / token")
    ax[1, 1].loglog(a["tokens"], a["cumulative_s"], **style["aaren"])
    ax[1, 1].loglog(t["tokens"], t["cumulative_s"], **style["transformer"])
    ax[1, 1].set(title="cumulative time", xlabel="tokens seen", ylabel="seconds")
    for axis in ax.flat:
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Streaming one token at a time\n" + title, fontsize=10)
    fig.tight_layout()
    paths = [os.path.join(out_dir, f"streaming_{dev}.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    p = results.get("parallel")
    if p:
        fig, axis = plt.subplots(figsize=(6.5, 4.5))
        for name in ("aaren", "transformer"):
            ns = [n for m, n in zip(p["model"], p["N"]) if m == name]
            ss = [s * 1e3 for m, s in zip(p["model"], p["fwd_bwd_s"]) if m == name]
            axis.loglog(ns, ss, marker="o", color=style[name]["color"],
                        label="Aaren (aaren.scan)" if name == "aaren"
                        else "Transformer (SDPA, is_causal=True)")
        axis.set(title=f"Parallel (training) forward + backward, {dev.upper()}, batch 1\n"
                       f"E={info['d_model']}, {info['num_layers']} layers, {info['nhead']} heads",
                 xlabel="sequence length N", ylabel="ms")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"parallel_{dev}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------- driving


def _worker_command(args, kind: str, device: str) -> List[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--device", device,
           "--tokens", str(args.tokens), "--d-model", str(args.d_model), "--heads", str(args.heads),
           "--layers", str(args.layers), "--threads", str(args.threads), "--seed", str(args.seed)]
    return cmd + (["--no-progress"] if args.no_progress else [])


def _stream_in_children(args, device: str) -> Dict[str, dict]:
    """Each model streams in its own child process, so that its process memory is its own;
    the two take turns, CHUNK tokens at a time (the idle one waits on its stdin), so that
    both are timed under the same machine load."""
    models = ("aaren", "transformer")
    procs = {m: subprocess.Popen(_worker_command(args, m, device), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1) for m in models}
    results: Dict[str, dict] = {}
    bar = _progress(args.tokens, f"Aaren + Transformer streaming, lockstep ({device})",
                    not args.no_progress)
    try:
        while len(results) < len(procs):
            for m, proc in procs.items():
                if m in results:
                    continue
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the {m} worker stopped (exit status {proc.wait()})")
                if line.startswith("{"):
                    results[m] = json.loads(line)
            bar.update(min(args.tokens, bar.n + CHUNK) - bar.n)
    finally:
        bar.close()
        for proc in procs.values():
            if proc.poll() is None and len(results) < len(procs):
                proc.kill()
            proc.stdin.close()
            proc.wait()
    return results


def _worker(args) -> None:
    """Child process: one model streams a chunk per line read from stdin, answering a line
    per chunk and finally its results as one JSON line; or the cat probe."""
    torch.set_num_threads(args.threads)
    common = dict(d_model=args.d_model, nhead=args.heads, num_layers=args.layers,
                  device=args.device[0], seed=args.seed)
    if args.worker == "cat":
        print(json.dumps(probe_cat(args.tokens, progress=not args.no_progress, **common)))
        return
    chunks = stream_chunks(args.worker, args.tokens, **common)
    for _ in sys.stdin:
        try:
            print(f"chunk {next(chunks)}", flush=True)
        except StopIteration as stop:
            print(json.dumps(stop.value), flush=True)
            return


def run(args, device: str) -> dict:
    torch.set_num_threads(args.threads)
    _, _, info = build_stacks(args.d_model, args.heads, args.layers)
    results = {"device": device, "tokens": args.tokens, "threads": args.threads, "info": info}
    progress = not args.no_progress
    common = dict(d_model=args.d_model, nhead=args.heads, num_layers=args.layers, device=device,
                  seed=args.seed, progress=progress)
    if args.in_process:
        results.update(stream_lockstep(["aaren", "transformer"], args.tokens, **common))
    else:
        results.update(_stream_in_children(args, device))
    if not args.no_cat_probe:
        if args.in_process:
            results["transformer_cat"] = probe_cat(args.tokens, **common)
        else:
            done = subprocess.run(_worker_command(args, "cat", device), stdout=subprocess.PIPE,
                                  text=True, check=True)
            results["transformer_cat"] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.parallel_lengths:
        results["parallel"] = parallel(args.parallel_lengths, **common)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens to stream (default 65536; 2048 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="2048 tokens and a small parallel grid: a fast sanity run")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: one stream per core, steadier timings)")
    parser.add_argument("--device", action="append", default=None,
                        help="cpu and/or cuda (repeatable); default cpu, and cuda too if present")
    parser.add_argument("--parallel-lengths", type=lambda s: [int(x) for x in s.split(",") if x],
                        default=None,
                        help="comma-separated N for forward+backward (default 256..16384; "
                             "256..2048 with --quick; empty string: skip)")
    parser.add_argument("--no-cat-probe", action="store_true",
                        help="skip the torch.cat-cache latency probe")
    parser.add_argument("--out", default=None,
                        help=f"where the CSV and PNG files go (default {os.path.relpath(RESULTS)}; "
                             f"with --quick a folder in {tempfile.gettempdir()}, so that a quick "
                             f"run does not replace the recorded results)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (faster start; process memory then "
                             "mixes both models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["aaren", "transformer", "cat"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokens is None:
        args.tokens = 2048 if args.quick else 65536
    if args.parallel_lengths is None:
        args.parallel_lengths = ([256, 512, 1024, 2048] if args.quick else
                                 [256, 512, 1024, 2048, 4096, 8192, 16384])
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "aaren_bench_streaming_quick")
                    if args.quick else RESULTS)
    if args.device is None:
        args.device = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return args


def main(argv=None) -> Dict[str, dict]:
    args = parse_args(argv)
    if args.worker:  # a child process of this script
        _worker(args)
        return {}
    os.makedirs(args.out, exist_ok=True)
    all_results = {}
    for device in args.device:
        results = run(args, device)
        all_results[device] = results
        info = results["info"]
        print(f"\nparameters: Aaren {info['params_aaren']:,} (feed-forward {info['ffn_aaren']}), "
              f"Transformer {info['params_transformer']:,} (feed-forward {info['ffn_transformer']})")
        print(summarize(results))
        written = write_csv(results, args.out)
        if not args.no_plots:
            written += plot(results, args.out)
        print("\nwrote " + ", ".join(os.path.relpath(p) for p in written))
    return all_results


if __name__ == "__main__":
    main()
