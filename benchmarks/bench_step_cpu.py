"""Per-token latency of the one-token step (`AarenEncoder.step`) on the CPU, against what its
arithmetic costs, and against the KV-cache Transformer of the same size.

For each (E, layers) and batch, on one thread, under `torch.inference_mode`, measured side by
side in one run (medians over the tokens). Each variant streams the tokens in turn, `--block`
tokens at a time (default 50: a stream as a user runs it; `--block 1` alternates token by
token, which also makes every variant pay for the others' cache traffic), carrying its state
from block to block; the blocks alternate, so the variants share the machine's load:
  - products: the same layers' matrix-vector products alone, in eager PyTorch (per layer
    `F.linear` with the score projection [H, E] folded once, v_proj, out_proj, linear1,
    linear2): what the step's arithmetic costs;
  - eager: `AarenEncoder.step` as written;
  - scripted: `torch.jit.script(stack).step` (TorchScript, from Python);
  - compiled (with --compile): `torch.compile(stack.step)`, as a user would write it;
  - fast (with --compile): `stack.compile_step()`, the package's documented fast path for
    Python (one graph from the first token on, its own compiled-graph cache);
  - Transformer: `aaren.baselines.KVCacheTransformer.step` (eager, preallocated cache) against
    the eager Aaren step over the first 16 tokens of fresh streams, the two alternating token
    by token: the median ratio, and the smallest ratio at any one position 1..16.
The ratios to `products` are the figures the issue's targets are stated in. `--profile`
prints where the eager and the fast step's time goes (torch.profiler, operators by self CPU
time). `--cpp BINARY` also exports each (E, layers) stack, the same one, with
examples/export.py (TorchScript and an AOTInductor package, without its input projection and
head) and runs the C++ program examples/cpp (BINARY: its build, docs/deploy.md) on both, one
thread, for each batch: its per-token p50 against the products' time, measured in this process
right before and after each run (the median of the two).

    python benchmarks/bench_step_cpu.py                # the grid, about a minute
    python benchmarks/bench_step_cpu.py --compile --profile   # the figures of docs/results.md
    python benchmarks/bench_step_cpu.py --smoke        # tiny, in seconds (checks it runs)
    python benchmarks/bench_step_cpu.py --cpp build/deploy/cpp/aaren_deploy   # and C++, ~5 min
    python benchmarks/bench_step_cpu.py --cpp-only --cpp build/deploy/cpp/aaren_deploy  # ~3 min
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from aaren.baselines import build_stacks

GRID = [(64, 2), (256, 4)]
BATCHES = [1, 8]
HEADS = 4


def layer_products(stack):
    """The step's matrix-vector products per layer as (weight, bias) pairs, the score
    projection folded into one [H, E] matrix as the step computes it."""
    products = []
    for layer in stack.layers:
        attention = layer.self_attn
        score_weight, score_bias = attention._score_projection()
        products.append([(score_weight, score_bias),
                         (attention.v_proj.weight, attention.v_proj.bias),
                         (attention.out_proj.weight, attention.out_proj.bias),
                         (layer.linear1.weight, layer.linear1.bias),
                         (layer.linear2.weight, layer.linear2.bias)])
    return products


def run_products(products, x):
    """The products in the order the step chains them (each layer's input is x)."""
    for layer in products:
        score_w, v_w, out_w, up, down = layer
        F.linear(x, *score_w)
        value = F.linear(x, *v_w)
        x = F.linear(value, *out_w)
        F.linear(F.linear(x, *up), *down)
    return x


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(E, layers, batch, tokens, compile_step, block):
    # A plain torch.compile(stack.step) of every size shares AarenEncoder.step's compiled-graph
    # cache, whose limit the grid would exceed (compile_step has one of its own).
    torch._dynamo.reset()
    torch.manual_seed(0)
    stack, transformer, _ = build_stacks(E, HEADS, layers)
    stack.eval()
    transformer.eval()
    times = {name: [] for name in ("products", "eager", "scripted", "compiled", "fast",
                                   "transformer first", "aaren first")}
    first = {"aaren": [[] for _ in range(16)], "transformer": [[] for _ in range(16)]}
    with torch.inference_mode():
        products = layer_products(stack)
        xs = torch.randn(tokens, batch, E)
        scripted = torch.jit.script(stack)
        steps = {"eager": stack.step, "scripted": scripted.step}
        if compile_step:
            steps["compiled"] = torch.compile(stack.step)  # as a user would write it
            steps["fast"] = stack.compile_step()  # the package's documented fast path
        states = {name: None for name in steps}
        for warm in range(8):  # code paths, allocator, compilation, TorchScript's profiling runs
            for name, step in steps.items():
                _, states[name] = step(xs[warm], states[name])
            run_products(products, xs[warm])
        for name in states:
            states[name] = None
        # Each variant streams the tokens in turn, `block` tokens at a time, its state carried
        # from block to block; the blocks alternate, so the variants share the machine's load.
        for start in range(0, tokens, block):
            chunk = range(start, min(start + block, tokens))
            for t in chunk:
                times["products"].append(timed(lambda: run_products(products, xs[t])))
            for name, step in steps.items():
                for t in chunk:
                    def one():
                        _, states[name] = step(xs[t], states[name])
                    times[name].append(timed(one))
        # Streaming from the first token: the two models alternate token by token, 16 tokens
        # from an empty state, repeated (fresh state and cache each time).
        for _ in range(max(1, tokens // 16)):
            aaren_state, cache = None, transformer.new_state()
            for t in range(16):
                x = xs[t]

                def aaren_one():
                    nonlocal aaren_state
                    _, aaren_state = stack.step(x, aaren_state)

                def transformer_one():
                    nonlocal cache
                    _, cache = transformer.step(x, cache)
                first["aaren"][t].append(timed(aaren_one))
                first["transformer"][t].append(timed(transformer_one))
    times["aaren first"] = [x for ts in first["aaren"] for x in ts]
    times["transformer first"] = [x for ts in first["transformer"] for x in ts]
    # Transformer / Aaren at each position 1..16 (medians over the repeats): the smallest.
    worst_first = min(statistics.median(tr) / statistics.median(aa)
                      for tr, aa in zip(first["transformer"], first["aaren"]))
    # Every variant streamed the same tokens: their states must agree (to the rounding).
    for name in ("scripted", "compiled", "fast"):
        if states.get(name) is not None:
            for (lse, out), (lse_ref, out_ref) in zip(states[name], states["eager"]):
                torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    medians = {name: statistics.median(ts) if ts else None for name, ts in times.items()}
    spread = {name: (statistics.quantiles(ts, n=10)[8] / statistics.median(ts) if len(ts) >= 10 else None)
              for name, ts in times.items()}
    return medians, spread, worst_first


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=400, help="tokens streamed per variant")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(stack.step) and stack.compile_step()")
    parser.add_argument("--block", type=int, default=50,
                        help="tokens each variant streams before the next takes its turn "
                             "(1: alternate token by token)")
    parser.add_argument("--profile", action="store_true", help="profile the eager step (E=64, 2 layers, batch 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny: checks that the script runs")
    parser.add_argument("--cpp", metavar="BINARY",
                        help="also run the C++ program (examples/cpp's aaren_deploy) on each stack "
                             "exported as TorchScript and AOTInductor")
    parser.add_argument("--cpp-only", action="store_true", help="with --cpp: skip the Python variants")
    args = parser.parse_args()
    if args.cpp and not (os.path.isfile(args.cpp) and os.access(args.cpp, os.X_OK)):
        parser.error(f"--cpp {args.cpp}: not an executable file; build examples/cpp first "
                     f"(docs/deploy.md)")
    if args.cpp_only and not args.cpp:
        parser.error("--cpp-only needs --cpp")
    torch.set_num_threads(1)
    grid, batches, tokens = (([(16, 1)], [1], 24) if args.smoke else (GRID, BATCHES, args.tokens))
    block = min(args.block, tokens)
    if not args.cpp_only:
        print(f"torch {torch.__version__}, 1 thread, {HEADS} heads, float32; per-token medians over "
              f"{tokens} tokens in blocks of {block} (first tokens: {max(1, tokens // 16) * 16})\n")
    header = ["E", "layers", "batch", "products us", "eager us", "eager / products",
              "scripted us", "scripted / products"]
    if args.compile:
        header += ["compiled us", "compiled / products", "fast us", "fast / products"]
    header += ["Aaren first 16 us", "Transformer first 16 us", "Transformer / Aaren",
               "smallest at one position", "eager p90 / p50"]
    rows = []
    for E, layers in ([] if args.cpp_only else grid):
        for batch in batches:
            m, spread, worst_first = measure(E, layers, batch, tokens, args.compile, block)
            us = {k: None if v is None else 1e6 * v for k, v in m.items()}
            row = [E, layers, batch, f"{us['products']:.1f}", f"{us['eager']:.1f}",
                   f"{m['eager'] / m['products']:.1f}x", f"{us['scripted']:.1f}",
                   f"{m['scripted'] / m['products']:.1f}x"]
            if args.compile:
                row += [f"{us['compiled']:.1f}", f"{m['compiled'] / m['products']:.1f}x",
                        f"{us['fast']:.1f}", f"{m['fast'] / m['products']:.1f}x"]
            row += [f"{us['aaren first']:.1f}", f"{us['transformer first']:.1f}",
                    f"{m['transformer first'] / m['aaren first']:.2f}x", f"{worst_first:.2f}x",
                    f"{spread['eager']:.2f}"]
            rows.append(row)
            print(f"measured E={E} layers={layers} batch={batch}", flush=True)
    if rows:
        print()
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(str(x) for x in row) + " |")
    if args.cpp:
        rows += print_cpp_table(args.cpp, grid, batches, tokens)
    if args.profile:
        profile_eager(*((16, 1) if args.smoke else (64, 2)))
    if args.smoke:  # every figure a positive number (the streams agreed: checked in measure)
        bad = [cell for row in rows for cell in row[3:] if not float(str(cell).rstrip("x")) > 0]
        print("smoke check " + (f"FAILED: {bad}" if bad else "passed"))
        return 1 if bad else 0
    return 0


def products_seconds(products, batch, E, tokens=200):
    """Median time of the products for one token of `batch` sequences."""
    xs = torch.randn(tokens, batch, E)
    for x in xs[:8]:
        run_products(products, x)
    return statistics.median(timed(lambda: run_products(products, x)) for x in xs)


def measure_cpp(binary, E, layers, batches, tokens, work_dir):
    """Per batch: the products' time, and the C++ program's per-token p50 (examples/cpp, one
    thread) for the stack of `measure` exported as TorchScript and as AOTInductor."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import export as exporter  # examples/export.py: the exports the C++ program loads

    torch.manual_seed(0)
    stack, _, _ = build_stacks(E, HEADS, layers)
    model = exporter.StreamingModel(E, E, HEADS, layers, E, encoder=stack, projections=False).eval()
    paths = {"TorchScript": os.path.join(work_dir, f"step_{E}_{layers}.pt"),
             "AOTInductor": os.path.join(work_dir, f"step_{E}_{layers}.pt2")}
    x = torch.randn(2, 6, E)
    with torch.no_grad():
        want, want_step = model(x), exporter.stream(model.step, x, None)
    exporter.export_torchscript(model, paths["TorchScript"], x, want)
    exporter.export_aoti(model, paths["AOTInductor"], torch.device("cpu"), x, want, want_step)
    products = layer_products(stack)
    results = {}
    for batch in batches:
        for fmt, path in paths.items():
            with torch.inference_mode():
                before = products_seconds(products, batch, E)
            command = [binary, path, "--batch", str(batch), "--length", str(tokens),
                       "--threads", "1", "--warmup", "5", "--show", "0"]
            run = subprocess.run(command, capture_output=True, text=True)
            found = re.search(r"p50 ([0-9.]+) ms", run.stdout)
            if run.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed (exit {run.returncode}):\n"
                                   f"{run.stdout}\n{run.stderr}")
            if found is None:
                raise RuntimeError(f"{' '.join(command)} printed no 'p50 ... ms' latency: is "
                                   f"{binary} examples/cpp's aaren_deploy? Its output:\n"
                                   f"{run.stdout}\n{run.stderr}")
            with torch.inference_mode():
                after = products_seconds(products, batch, E)
            results[batch, fmt] = (statistics.median([before, after]), 1e-3 * float(found.group(1)))
    return results


def print_cpp_table(binary, grid, batches, tokens):
    print(f"\nThe C++ program ({binary}), torch {torch.__version__}, {HEADS} heads, float32, 1 thread, "
          f"per-token p50 over {tokens} tokens:\n")
    header = ["E", "layers", "batch", "products us", "TorchScript p50 us", "TorchScript / products",
              "AOTInductor p50 us", "AOTInductor / products"]
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        for E, layers in grid:
            results = measure_cpp(binary, E, layers, batches, tokens, work_dir)
            for batch in batches:
                products = statistics.median([results[batch, f][0] for f in ("TorchScript", "AOTInductor")])
                script, aoti = results[batch, "TorchScript"][1], results[batch, "AOTInductor"][1]
                rows.append([E, layers, batch, f"{1e6 * products:.1f}", f"{1e6 * script:.1f}",
                             f"{script / products:.1f}x", f"{1e6 * aoti:.1f}", f"{aoti / products:.1f}x"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    return rows


def profile_eager(E, layers):
    """Where the step's time goes: operators by self CPU time over 200 tokens, for the eager
    step and for the fast path (compile_step)."""
    torch.manual_seed(0)
    stack, _, _ = build_stacks(E, HEADS, layers)
    stack.eval()
    with torch.inference_mode():
        xs = torch.randn(200, 1, E)
        for name, step in (("eager", stack.step), ("fast (compile_step)", stack.compile_step())):
            state = None
            for x in xs[:20]:
                _, state = step(x, state)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for x in xs:
                    _, state = step(x, state)
            print(f"\nProfile of the {name} step, E={E}, {layers} layers, batch 1 (200 tokens):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    sys.exit(main())
