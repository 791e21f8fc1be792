"""Long runs and load (issue 28, part 4): does anything grow, drift or race?

Three runs, each printing its figures (docs/results.md, "Long runs and load"):

1. **A long stream.** `--tokens` (default 1,000,000) tokens, batch 1, through an
   `aaren.AarenEncoder` (E=32, 4 heads, 2 layers, feed-forward 64, eval,
   `torch.inference_mode`) by its fastest Python path, `encoder.compile_step()` (`--path
   eager` for `encoder.step`). The tokens come in blocks of 10,000; each block also goes
   through `prefill` (the parallel scan) of the same encoder and of its float64 twin, each
   continuing its own state, and every step output and every prefill output is compared
   with the twin's. Sampled every 10,000 tokens: the process RSS (/proc/self/statm), the
   state's bytes and those errors; every tenth of the run, the number of objects the
   garbage collector tracks (after `gc.collect()`). Reported: the RSS slope after warm-up
   (the first 10% of the run) in KiB per 100k tokens, by least squares over the samples,
   the objects' slope likewise, and the largest error of each path in each tenth of the
   stream (drift would make it rise).

2. **A long training run.** `--train-steps` (default 10,000) AdamW steps of a small model
   (Linear(1, 32) -> that encoder, in training mode with dropout 0.1 -> Linear(32, 1);
   batch 16, 64 tokens; the README's task: the running mean of a stream of numbers).
   Sampled every 100 steps: RSS; every twentieth of the run: tracked objects and the
   tensors alive with a `grad_fn` (an autograd graph kept alive between steps: must be 0).
   Reported: slopes per 1,000 steps after warm-up (the first 10%), and the loss at the
   start and the end.

3. **Eight threads.** Eight Python threads, each streaming its own tokens (batch 1 or 2,
   alternately) and its own state through the same encoder at once, for `--thread-tokens`
   tokens each, by `encoder.step` (eager, with the cached projection), `compile_step()` and
   a `torch.jit.script` copy's `step`; every thread's outputs and final state must equal,
   bit for bit, those of the same stream run alone, one after another. With `--cpp
   BUILD_DIR` the C++ program examples/cpp/threads does the same from eight `std::thread`s
   on a TorchScript copy (built there with its own CMake invocation; a build directory that
   another environment configured, another torch's or a removed venv's, is configured again
   from scratch: benchmarks/cmake_cache.py).

Exit status 1 when a hard check fails (a thread's outputs differ, step or prefill is over
1e-4 from the float64 twin, the state grows, an autograd graph outlives its step, tracked objects grow
after warm-up); the RSS slope is reported, not judged (malloc's own bookkeeping moves it).

    python benchmarks/bench_soak.py                     # about 15 minutes on a busy 2-core machine
    python benchmarks/bench_soak.py --quick             # under a minute: 20,000 tokens, 300 steps (eager step)
    python benchmarks/bench_soak.py --quick --cpp build/soak/cpp   # and the C++ threads
"""
import argparse
import copy
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import aaren

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling cmake_cache.py
import cmake_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEADS, LAYERS, FEEDFORWARD = 32, 4, 2, 64
BLOCK = 10_000  # tokens between samples (and between step-vs-prefill checks)


# --------------------------------------------------------------------------- measuring


def rss_kib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024


def peak_rss_kib() -> float:
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def tracked_objects() -> int:
    gc.collect()
    return len(gc.get_objects())


def tensors_with_graph() -> int:
    """Tensors alive that still hold an autograd graph (a grad_fn)."""
    gc.collect()
    count = 0
    with warnings.catch_warnings():  # isinstance() on deprecated module proxies warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
                    count += 1
            except Exception:  # noqa: BLE001  (objects that cannot be inspected)
                pass
    return count


def slope(xs: List[float], ys: List[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def after_warmup(samples: List[Dict], key: str, warm: float) -> Tuple[List[float], List[float]]:
    kept = [s for s in samples if s["at"] >= warm and key in s]
    return [s["at"] for s in kept], [s[key] for s in kept]


def state_bytes(states) -> int:
    return sum(t.numel() * t.element_size() for pair in states for t in pair)


def make_encoder(seed: int = 0, dropout: float = 0.0) -> aaren.AarenEncoder:
    torch.manual_seed(seed)
    layer = aaren.AarenEncoderLayer(WIDTH, HEADS, dim_feedforward=FEEDFORWARD, dropout=dropout,
                                    batch_first=True, norm_first=True)
    encoder = aaren.AarenEncoder(layer, LAYERS, norm=nn.LayerNorm(WIDTH))
    for lyr in encoder.layers:  # deep copies start identical: give each its own weights
        lyr.self_attn.reset_parameters()
        lyr.linear1.reset_parameters()
        lyr.linear2.reset_parameters()
    return encoder


# --------------------------------------------------------------------------- 1. stream


def block_tokens(index: int, batch: int = 1) -> torch.Tensor:
    """Block `index` of the stream: [BLOCK, batch, E], the same every time it is asked for."""
    g = torch.Generator().manual_seed(1_000_003 * index + 17)
    return torch.randn(BLOCK, batch, WIDTH, generator=g)


def tenths(samples: List[Dict], key: str) -> List[float]:
    """The largest `key` in each tenth of the samples (fewer parts for short runs)."""
    parts = min(10, len(samples))
    size = len(samples) / parts
    return [max(s[key] for s in samples[round(i * size):round((i + 1) * size)]) for i in range(parts)]


def run_stream(tokens: int, path: str, log: Callable[[str], None]) -> Dict:
    encoder = make_encoder().eval()
    reference = copy.deepcopy(encoder).double()  # the float64 twin: the stream's reference
    step = encoder.compile_step() if path == "compiled" else encoder.step
    blocks = max(1, tokens // BLOCK)
    samples: List[Dict] = []
    states = prefill_states = reference_states = None
    state_sizes = set()
    ys = torch.empty(BLOCK, 1, WIDTH)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(blocks):
            xs = block_tokens(b)
            for t in range(BLOCK):
                y, states = step(xs[t], states)
                ys[t] = y
            # the same block by the parallel scan, in float32 and in float64, each continuing
            # its own state from the blocks before
            y_chunk, prefill_states = encoder.prefill(xs.transpose(0, 1), prefill_states)
            y_ref, reference_states = reference.prefill(xs.transpose(0, 1).double(), reference_states)
            y_ref = y_ref.transpose(0, 1)
            state_sizes.add(state_bytes(states))
            samples.append({
                "at": (b + 1) * BLOCK, "rss_kib": rss_kib(),
                "step_error": (ys.double() - y_ref).abs().max().item(),
                "prefill_error": (y_chunk.transpose(0, 1).double() - y_ref).abs().max().item(),
                "seconds": time.perf_counter() - start})
            if (b + 1) % max(1, blocks // 10) == 0 or b + 1 == blocks:
                # (a full collection and a walk over every object: every tenth of the run)
                samples[-1]["objects"] = tracked_objects()
                s = samples[-1]
                log(f"  stream: {s['at']:>9,} tokens  {s['seconds']:7.1f} s  RSS {s['rss_kib'] / 1024:7.1f} MiB"
                    f"  objects {s['objects']}  |step - float64| {s['step_error']:.2e}"
                    f"  |prefill - float64| {s['prefill_error']:.2e}")
            y = None
    seconds = time.perf_counter() - start
    warm = 0.1 * blocks * BLOCK if blocks >= 10 else BLOCK
    rss_at, rss = after_warmup(samples, "rss_kib", warm)
    objects_at, objects = after_warmup(samples, "objects", warm)
    return {
        "tokens": blocks * BLOCK, "path": path, "seconds": seconds,
        "us_per_token_with_checks": 1e6 * seconds / (blocks * BLOCK),
        "rss_start_mib": samples[0]["rss_kib"] / 1024, "rss_end_mib": samples[-1]["rss_kib"] / 1024,
        "rss_slope_kib_per_100k_tokens": 1e5 * slope(rss_at, rss),
        "rss_growth_after_warmup_kib": rss[-1] - rss[0] if rss else 0.0,
        "objects_after_warmup": [objects[0], objects[-1]] if objects else [],
        "objects_slope_per_100k_tokens": 1e5 * slope(objects_at, objects),
        "state_bytes": sorted(state_sizes),
        # largest error against the float64 twin, per tenth of the stream: drift would rise
        "step_error_by_tenth": tenths(samples, "step_error"),
        "prefill_error_by_tenth": tenths(samples, "prefill_error"),
        "samples": samples,
    }


# --------------------------------------------------------------------------- 2. training


def run_training(steps: int, log: Callable[[str], None]) -> Dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, WIDTH), make_encoder(dropout=0.1), nn.Linear(WIDTH, 1)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    positions = torch.arange(1, 65, dtype=torch.float32).view(1, 64, 1)

    def one_step() -> float:
        x = torch.randn(16, 64, 1, generator=g)
        loss = F.mse_loss(model(x), x.cumsum(1) / positions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    samples: List[Dict] = []
    losses: List[float] = []
    every = 100 if steps >= 1000 else max(1, steps // 10)
    start = time.perf_counter()
    window: List[float] = []
    for i in range(1, steps + 1):
        window.append(one_step())
        if i % every == 0:
            losses.append(sum(window) / len(window))
            window = []
            samples.append({"at": i, "rss_kib": rss_kib(), "seconds": time.perf_counter() - start})
            if i % max(every, steps // 20) == 0 or i == steps:
                # (a full collection and two walks over every object: every twentieth of the run)
                samples[-1]["objects"] = tracked_objects()
                samples[-1]["graph_tensors"] = tensors_with_graph()
            if i % max(every, steps // 10) == 0:
                s = samples[-1]
                log(f"  training: {i:>6,} steps  {s['seconds']:7.1f} s  RSS {s['rss_kib'] / 1024:7.1f} MiB"
                    f"  objects {s.get('objects', '-')}  tensors with grad_fn {s.get('graph_tensors', '-')}"
                    f"  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    warm = 0.1 * steps
    rss_at, rss = after_warmup(samples, "rss_kib", warm)
    objects_at, objects = after_warmup(samples, "objects", warm)
    return {
        "steps": steps, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps,
        "rss_start_mib": samples[0]["rss_kib"] / 1024, "rss_end_mib": samples[-1]["rss_kib"] / 1024,
        "rss_slope_kib_per_1k_steps": 1e3 * slope(rss_at, rss),
        "rss_growth_after_warmup_kib": rss[-1] - rss[0] if rss else 0.0,
        "objects_after_warmup": [objects[0], objects[-1]] if objects else [],
        "objects_slope_per_1k_steps": 1e3 * slope(objects_at, objects),
        "graph_tensors_max": max(s["graph_tensors"] for s in samples if "graph_tensors" in s),
        "graph_samples": sum(1 for s in samples if "graph_tensors" in s),
        "loss_first": losses[0], "loss_last": losses[-1],
        "samples": samples,
    }


# --------------------------------------------------------------------------- 3. threads


def stream_alone(step, xs: torch.Tensor):
    """xs [T, B, E] through `step` from the empty state: (outputs [T, B, E], final states)."""
    states, outs = None, []
    with torch.inference_mode():
        for t in range(xs.size(0)):
            y, states = step(xs[t], states)
            outs.append(y)
    return torch.stack(outs), states


def run_threads(threads: int, tokens: int, with_compiled: bool, log: Callable[[str], None]) -> Dict:
    encoder = make_encoder(seed=3).eval()
    variants = {"eager step": encoder.step}
    if with_compiled:
        variants["compile_step()"] = encoder.compile_step()
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; still supported
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(encoder)
    variants["TorchScript step"] = scripted.step
    inputs = []
    for i in range(threads):
        g = torch.Generator().manual_seed(100 + i)
        inputs.append(torch.randn(tokens, 1 + i % 2, WIDTH, generator=g))
    results = {}
    for name, step in variants.items():
        # warm-up, untimed: compiles both batch sizes (compile_step) and lets TorchScript
        # profile its first calls and settle on its optimized plan before anything is compared
        for xs in inputs[:2]:
            stream_alone(step, xs[:20])
        alone = [stream_alone(step, xs) for xs in inputs]
        got: List[Optional[Tuple]] = [None] * threads
        errors: List[BaseException] = []
        barrier = threading.Barrier(threads)

        def work(i):
            try:
                barrier.wait()
                got[i] = stream_alone(step, inputs[i])
            except BaseException as error:  # noqa: BLE001  (reported below)
                errors.append(error)
        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        seconds = time.perf_counter() - start
        equal = not errors and all(
            g is not None and torch.equal(g[0], a[0]) and
            all(torch.equal(p, q) for gs, as_ in zip(g[1], a[1]) for p, q in zip(gs, as_))
            for g, a in zip(got, alone))
        results[name] = {"bitwise_equal": equal, "seconds": seconds,
                         "errors": [f"{type(e).__name__}: {e}" for e in errors]}
        log(f"  threads: {name:<17} {threads} threads x {tokens} tokens in {seconds:6.2f} s:"
            f" {'bitwise equal to one at a time' if equal else 'DIFFERENT'}"
            f"{' ' + str(results[name]['errors'][:1]) if errors else ''}")
    return {"threads": threads, "tokens_per_thread": tokens, "variants": results}


# --------------------------------------------------------------------------- C++ threads


def run_cpp(build_dir: str, threads: int, tokens: int, log: Callable[[str], None]) -> Dict:
    """Builds examples/cpp/threads into build_dir (its own CMake project) and runs it on a
    TorchScript copy of the encoder."""
    source = os.path.join(ROOT, "examples", "cpp", "threads")
    aaren_prefix = aaren_cmake_prefix()
    prefix = ";".join([aaren_prefix, torch.utils.cmake_prefix_path])
    cmake, ninja = tool("cmake"), tool("ninja")
    if cmake is None:
        raise SystemExit("--cpp needs CMake (pip install 'cmake>=3.26' ninja)")
    configure = [cmake, "-S", source, "-B", build_dir, f"-DCMAKE_PREFIX_PATH={prefix}"]
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    # A cache configured by another environment (a removed venv's cmake or ninja, another
    # torch or aaren) is configured again from scratch: benchmarks/cmake_cache.py.
    stale = cmake_cache.stale_reason(
        build_dir, {"Torch": torch.utils.cmake_prefix_path, "aaren": aaren_prefix},
        make_program=ninja)
    if stale:
        log(f"  C++: configuring {build_dir} again ({stale})")
        configure.append("--fresh")
    configured = os.path.exists(os.path.join(build_dir, "CMakeCache.txt")) and not stale
    start = time.perf_counter()
    for command in ([] if configured else [configure]) + [[cmake, "--build", build_dir]]:
        made = subprocess.run(command, capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"building examples/cpp/threads failed ({' '.join(command[:2])} ...):\n"
                             f"{made.stdout[-3000:]}{made.stderr[-3000:]}")
    build_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "encoder.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.script(make_encoder(seed=5).eval()).save(model)
        program = os.path.join(build_dir, "aaren_threads")
        run = subprocess.run([program, model, "--threads", str(threads), "--tokens", str(tokens),
                              "--width", str(WIDTH)], capture_output=True, text=True)
    for line in run.stdout.strip().splitlines():
        log(f"  C++: {line}")
    if run.returncode != 0:
        log(f"  C++: exit status {run.returncode}: {run.stderr.strip()[-2000:]}")
    return {"exit_status": run.returncode, "build_seconds": build_seconds,
            "output": run.stdout.strip().splitlines()}


def tool(name: str) -> Optional[str]:
    """The interpreter's environment's `name` (pip's cmake and ninja), else PATH's."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else shutil.which(name)


def aaren_cmake_prefix() -> str:
    return subprocess.run([sys.executable, "-m", "aaren", "--cmake-prefix-path"], check=True,
                          capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="under a minute: 20,000 tokens (eager step), 300 training steps, "
                             "100 tokens per thread")
    parser.add_argument("--tokens", type=int, default=None, help="tokens streamed (1,000,000)")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (10,000)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--thread-tokens", type=int, default=None, help="tokens per thread (2,000)")
    parser.add_argument("--path", choices=["compiled", "eager"], default=None,
                        help="the stream's step: compile_step() (default) or step (default with --quick)")
    parser.add_argument("--cpp", metavar="BUILD_DIR", default=None,
                        help="also build examples/cpp/threads there and run its eight threads")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stream", "training", "threads"])
    parser.add_argument("--json", default=None, help="write the figures (samples included) here")
    args = parser.parse_args(argv)
    tokens = args.tokens or (20_000 if args.quick else 1_000_000)
    steps = args.train_steps or (300 if args.quick else 10_000)
    thread_tokens = args.thread_tokens or (100 if args.quick else 2_000)
    path = args.path or ("eager" if args.quick else "compiled")

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"aaren soak: torch {torch.__version__}, aaren {aaren.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs")
    figures: Dict = {"torch": torch.__version__, "intra_op_threads": torch.get_num_threads()}
    failures: List[str] = []
    if "stream" not in args.skip:
        log(f"1. stream: {tokens:,} tokens through AarenEncoder(E={WIDTH}, {HEADS} heads, "
            f"{LAYERS} layers) by {'compile_step()' if path == 'compiled' else 'step'}")
        s = figures["stream"] = run_stream(tokens, path, log)
        log(f"   {s['us_per_token_with_checks']:.1f} us per token (checks included); RSS "
            f"{s['rss_start_mib']:.1f} -> {s['rss_end_mib']:.1f} MiB, slope after warm-up "
            f"{s['rss_slope_kib_per_100k_tokens']:+.1f} KiB per 100k tokens; tracked objects "
            f"{s['objects_after_warmup']} ({s['objects_slope_per_100k_tokens']:+.2f} per 100k tokens); "
            f"state {s['state_bytes']} B")
        log("   largest |output - float64 twin| per tenth of the stream: step "
            + " ".join(f"{e:.1e}" for e in s["step_error_by_tenth"]) + "; prefill "
            + " ".join(f"{e:.1e}" for e in s["prefill_error_by_tenth"]))
        if len(s["state_bytes"]) != 1:
            failures.append(f"the state's size changed: {s['state_bytes']}")
        for name in ("step", "prefill"):
            errors = s[f"{name}_error_by_tenth"]
            if not max(errors) <= 1e-4:
                failures.append(f"{name} is {max(errors):.2e} away from the float64 twin")
        if s["objects_after_warmup"] and s["objects_after_warmup"][-1] - s["objects_after_warmup"][0] > 100:
            failures.append(f"tracked objects grew during the stream: {s['objects_after_warmup']}")
    if "training" not in args.skip:
        log(f"2. training: {steps:,} AdamW steps, batch 16 x 64 tokens")
        t = figures["training"] = run_training(steps, log)
        log(f"   {t['ms_per_step']:.2f} ms per step; RSS {t['rss_start_mib']:.1f} -> {t['rss_end_mib']:.1f} MiB, "
            f"slope after warm-up {t['rss_slope_kib_per_1k_steps']:+.1f} KiB per 1k steps; tracked objects "
            f"{t['objects_after_warmup']} ({t['objects_slope_per_1k_steps']:+.2f} per 1k steps); "
            f"tensors with grad_fn between steps: at most {t['graph_tensors_max']}; "
            f"loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}")
        if t["graph_tensors_max"] != 0:
            failures.append(f"{t['graph_tensors_max']} tensors kept an autograd graph between steps")
        if t["objects_after_warmup"] and t["objects_after_warmup"][-1] - t["objects_after_warmup"][0] > 100:
            failures.append(f"tracked objects grew during training: {t['objects_after_warmup']}")
    if "threads" not in args.skip:
        log(f"3. threads: {args.threads} Python threads, {thread_tokens} tokens each, one module")
        th = figures["threads"] = run_threads(args.threads, thread_tokens, with_compiled=not args.quick, log=log)
        for name, r in th["variants"].items():
            if not r["bitwise_equal"]:
                failures.append(f"{name}: threads differ from one at a time {r['errors'][:1]}")
    if args.cpp:
        log(f"4. C++: {args.threads} std::threads, {thread_tokens} tokens each (examples/cpp/threads)")
        c = figures["cpp"] = run_cpp(args.cpp, args.threads, thread_tokens, log)
        if c["exit_status"] != 0:
            failures.append(f"the C++ threads program exited with {c['exit_status']}")
    figures["peak_rss_mib"] = peak_rss_kib() / 1024
    figures["failures"] = failures
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    for failure in failures:
        log(f"FAILED: {failure}")
    log("soak: " + ("FAILED" if failures else "all checks passed") +
        f" (peak RSS {figures['peak_rss_mib']:.1f} MiB)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
