"""CPU benchmark of aaren.scan, forward and forward+backward, side by side with its floors
and with what a user would otherwise write.

For each (B, N, H, D, dtype) it reports, measured in one run (medians of repeated calls; the
copy and the kernels, split and whole, take turns call by call, and each ratio is the median
of the ratios within a round, so that both sides of it share the machine's load):
  - aaren forward and backward kernels into reused output buffers (scan_forward_into /
    scan_backward_into): time, achieved GB/s, and the ratio to a plain copy of `values`
    into a reused buffer (`Tensor.copy_`, the memory-bandwidth floor; from 1 MiB of outputs
    per thread the kernels write theirs by streaming stores, which skip the read of each
    line a plain store makes: docs/design.md, "Performance on the CPU");
  - the allocating call `aaren.scan` (what autograd users get), and apart from it the
    cost of allocating and first touching its output: on Linux a tensor of 32 MiB or
    more is a fresh mmap on every allocation, and its page faults can cost more than
    the scan itself;
  - the backward after a state (a chunk of a longer sequence, a context-parallel rank) against
    the same backward without one: a state costs its lse gradient, taken in float64 from the
    inputs (docs/design.md, "Backward");
  - the same kernels with the sequence left whole (AAREN_CPU_SEQUENCE_CHUNKS=1), against the
    kernels' own choice: what splitting long sequences into chunks buys (docs/design.md,
    "Performance on the CPU"; rows with at least as many sequences (batch x heads) as
    threads, so every row on one thread, are not split, and read ~1x);
  - speedups against a pure-PyTorch Hillis-Steele scan (aaren.reference) and against
    scaled_dot_product_attention(is_causal=True) with the same query at every position,
    forward and forward+backward (through autograd, allocating, as users run them); not
    measured past N = 16384, where causal attention's N^2 work takes hours ("-").
The benchmark sets AAREN_CPU_SEQUENCE_CHUNKS itself for every figure (0, the kernels' choice;
1 for the whole columns), whatever the environment says; AAREN_CPU_STREAMING_STORES, when
exported, applies and is named in the header.

    python benchmarks/bench_scan_cpu.py            # the grid, a few minutes
    python benchmarks/bench_scan_cpu.py --quick    # the headline shape only
    python benchmarks/bench_scan_cpu.py --shapes 1x16384x2x64,1x262144x1x64 --dtypes float32
    python benchmarks/bench_scan_cpu.py --smoke    # tiny, in seconds: checks the script runs,
                                                   # its outputs and its figures (CI runs it)
"""
import argparse
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import aaren
from aaren.reference import hillis_steele_scan

GRID = [
    # (B, N, H, D)
    (4, 4096, 8, 64),
    (4, 1024, 8, 64),
    (8, 2048, 16, 32),
    (1, 16384, 2, 64),
    (1, 262144, 1, 64),
]
BASELINE_MAX_LENGTH = 16384
# Settings of the kernels a user may have exported, named in the header when set
# (AAREN_CPU_SEQUENCE_CHUNKS is not one: the benchmark sets it itself, per column).
SETTINGS = ["AAREN_CPU_STREAMING_STORES"]
HEADLINE = (4, 4096, 8, 64)


def interleaved_times(fns, repeats):
    """Seconds of each of `fns` (a dict of callables) per round, run in turn once per round for
    `repeats` rounds after one warm-up call each: a burst of load from other work on the
    machine then falls on every function of a round alike, so their ratios hold where figures
    measured one function after another (9 calls of one, then 9 of the next) moved by +-30%."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times, numerator, denominator):
    """The median over rounds of sum(numerator's times) / sum(denominator's) within a round:
    each ratio pairs calls made moments apart, so that a burst of load (the copy here ran
    from 1.0 to 2.6 ms within minutes) moves both sides of it, where a ratio of medians
    taken over all rounds pairs calls from different moments."""
    return statistics.median(
        sum(times[name][i] for name in numerator) / sum(times[name][i] for name in denominator)
        for i in range(len(times[denominator[0]])))


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


CHUNKS_VARIABLE = "AAREN_CPU_SEQUENCE_CHUNKS"


@contextlib.contextmanager
def sequence_chunks(count):
    """The CPU kernels' chunk count per sequence (0: their own choice), for the block."""
    saved = os.environ.get(CHUNKS_VARIABLE)
    os.environ[CHUNKS_VARIABLE] = str(count)
    try:
        yield
    finally:
        if saved is None:
            del os.environ[CHUNKS_VARIABLE]
        else:
            os.environ[CHUNKS_VARIABLE] = saved


# Every timing in a row, the allocating call and the baselines included, under the kernels'
# own choice of chunks (the unsplit columns set 1 inside it), whatever the user exported.
@sequence_chunks(0)
def measure(B, N, H, D, dtype, repeats, baseline_repeats):
    torch.manual_seed(0)
    scores = torch.randn(B, N, H, dtype=dtype)
    values = torch.randn(B, N, H, D, dtype=dtype)
    out = torch.empty_like(values)
    lse = torch.empty(B, N, H, dtype=torch.float64)  # per-token lse and the state: float64
    final_out = torch.empty(B, H, D, dtype=torch.float64)
    grad_out = torch.randn_like(values)
    grads = [torch.empty_like(scores), torch.empty_like(values),
             torch.empty(B, H, dtype=torch.float64), torch.empty(B, H, D, dtype=torch.float64)]
    copy_target = torch.empty_like(values)
    # The same problem after a state: its forward's outputs, for its backward.
    state = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, D, dtype=torch.float64))
    out_after_state, lse_after_state, _ = torch.ops.aaren.scan_forward(scores, values, *state)

    def forward():
        torch.ops.aaren.scan_forward_into(scores, values, None, None, out, lse, final_out)

    def backward():
        torch.ops.aaren.scan_backward_into(grad_out, None, scores, values, out, lse, None, None, *grads)

    def backward_after_state():
        torch.ops.aaren.scan_backward_into(grad_out, None, scores, values, out_after_state,
                                           lse_after_state, *state, *grads)

    def whole(fn):  # the same kernel with each sequence left whole
        def run():
            with sequence_chunks(1):
                fn()
        return run

    rounds = interleaved_times({"copy": lambda: copy_target.copy_(values), "forward": forward,
                                "backward": backward, "backward_state": backward_after_state,
                                "forward_whole": whole(forward),
                                "backward_whole": whole(backward)}, repeats)
    t = {name: statistics.median(times) for name, times in rounds.items()}
    t_copy, t_forward, t_backward = t["copy"], t["forward"], t["backward"]
    t_scan_allocating = median_seconds(lambda: aaren.scan(scores, values), repeats)
    t_allocate = median_seconds(lambda: torch.empty_like(values).fill_(0), repeats)

    element = values.element_size()
    copy_bytes = 2 * values.numel() * element
    forward_bytes = (scores.numel() + 2 * values.numel()) * element + lse.numel() * lse.element_size()
    backward_bytes = (4 * values.numel() + 2 * scores.numel()) * element + lse.numel() * lse.element_size()

    # Baselines through autograd, as users run them.
    def hillis_steele_forward_backward():
        s, v = scores.detach().requires_grad_(), values.detach().requires_grad_()
        hillis_steele_scan(s, v).backward(grad_out)

    query = torch.randn(1, H, 1, D, dtype=dtype)

    def sdpa(requires_grad):
        k = values.transpose(1, 2).detach().requires_grad_(requires_grad)  # [B, H, N, D]
        v = values.transpose(1, 2).detach().requires_grad_(requires_grad)
        # Materialized, as a user's query is: with the stride-0 expanded view, PyTorch's
        # bfloat16 CPU backward takes a path that ran for many minutes at N = 4096.
        q = query.expand(B, H, N, D).contiguous()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if requires_grad:
            y.backward(grad_out.transpose(1, 2))

    def aaren_forward_backward():
        s, v = scores.detach().requires_grad_(), values.detach().requires_grad_()
        aaren.scan(s, v)[0].backward(grad_out)

    t_aaren_fb_autograd = median_seconds(aaren_forward_backward, baseline_repeats)
    if N <= BASELINE_MAX_LENGTH:
        t_hs = median_seconds(lambda: hillis_steele_scan(scores, values), baseline_repeats)
        t_hs_fb = median_seconds(hillis_steele_forward_backward, baseline_repeats)
        t_sdpa = median_seconds(lambda: sdpa(False), baseline_repeats)
        t_sdpa_fb = median_seconds(lambda: sdpa(True), baseline_repeats)
    else:
        t_hs = t_hs_fb = t_sdpa = t_sdpa_fb = None

    return {
        "shape": f"{B}x{N}x{H}x{D}", "dtype": str(dtype).replace("torch.", ""),
        "MiB": values.numel() * element / 2**20,
        "copy_ms": 1e3 * t_copy, "fwd_ms": 1e3 * t_forward, "bwd_ms": 1e3 * t_backward,
        "fwd_GBs": forward_bytes / t_forward / 1e9, "bwd_GBs": backward_bytes / t_backward / 1e9,
        "copy_GBs": copy_bytes / t_copy / 1e9,
        "fwd_vs_copy": paired_ratio(rounds, ["forward"], ["copy"]),
        "fwdbwd_vs_copy": paired_ratio(rounds, ["forward", "backward"], ["copy"]),
        "x_state_bwd": paired_ratio(rounds, ["backward_state"], ["backward"]),
        "x_whole_fwd": paired_ratio(rounds, ["forward_whole"], ["forward"]),
        "x_whole_fb": paired_ratio(rounds, ["forward_whole", "backward_whole"], ["forward", "backward"]),
        "scan_alloc_ms": 1e3 * t_scan_allocating, "alloc_ms": 1e3 * t_allocate,
        "fb_autograd_ms": 1e3 * t_aaren_fb_autograd,
        "x_hillis_fwd": ratio(t_hs, t_scan_allocating), "x_hillis_fb": ratio(t_hs_fb, t_aaren_fb_autograd),
        "x_sdpa_fwd": ratio(t_sdpa, t_scan_allocating), "x_sdpa_fb": ratio(t_sdpa_fb, t_aaren_fb_autograd),
    }


def ratio(baseline, ours):
    return None if baseline is None else baseline / ours


COLUMNS = [
    ("shape", "B x N x H x D", "{}"), ("dtype", "dtype", "{}"), ("MiB", "values MiB", "{:.1f}"),
    ("copy_ms", "copy ms", "{:.2f}"), ("fwd_ms", "fwd ms", "{:.2f}"), ("bwd_ms", "bwd ms", "{:.2f}"),
    ("copy_GBs", "copy GB/s", "{:.1f}"), ("fwd_GBs", "fwd GB/s", "{:.1f}"), ("bwd_GBs", "bwd GB/s", "{:.1f}"),
    ("fwd_vs_copy", "fwd / copy", "{:.2f}x"), ("fwdbwd_vs_copy", "fwd+bwd / copy", "{:.2f}x"),
    ("x_state_bwd", "bwd after a state / bwd", "{:.2f}x"),
    ("x_whole_fwd", "vs unsplit fwd", "{:.2f}x"), ("x_whole_fb", "vs unsplit fwd+bwd", "{:.2f}x"),
    ("scan_alloc_ms", "scan() ms (allocating)", "{:.2f}"), ("alloc_ms", "alloc+touch out ms", "{:.2f}"),
    ("fb_autograd_ms", "fwd+bwd autograd ms", "{:.2f}"),
    ("x_hillis_fwd", "vs Hillis-Steele fwd", "{:.0f}x"), ("x_hillis_fb", "vs Hillis-Steele fwd+bwd", "{:.0f}x"),
    ("x_sdpa_fwd", "vs causal SDPA fwd", "{:.0f}x"), ("x_sdpa_fb", "vs causal SDPA fwd+bwd", "{:.0f}x"),
]


def print_table(rows):
    print("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join("-" if row[key] is None else fmt.format(row[key])
                                for key, _, fmt in COLUMNS) + " |")


FLOATING_DTYPES = ("float32", "float64", "bfloat16", "float16")


def shape_list(text):
    """--shapes: comma-separated BxNxHxD, four positive integers each."""
    shapes = []
    for item in text.split(","):
        parts = item.split("x")
        if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(f"a shape is BxNxHxD, four positive integers, got {item!r}")
        shapes.append(tuple(int(part) for part in parts))
    return shapes


def dtype_list(text):
    """--dtypes: comma-separated floating dtypes, by their torch names."""
    names = text.split(",")
    for name in names:
        if name not in FLOATING_DTYPES:
            raise argparse.ArgumentTypeError(f"dtypes are among {', '.join(FLOATING_DTYPES)}, got {name!r}")
    return [getattr(torch, name) for name in names]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the headline shape only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--shapes", type=shape_list, help="comma-separated BxNxHxD rows instead of the grid")
    parser.add_argument("--dtypes", type=dtype_list,
                        help="comma-separated dtypes (default float32,bfloat16; float32 with --quick or --smoke)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        grid, dtypes, repeats, baseline_repeats = [(2, 64, 2, 8)], [torch.float32], 2, 1
    elif args.quick:
        grid, dtypes, repeats, baseline_repeats = [HEADLINE], [torch.float32], 9, 2
    else:
        grid, dtypes, repeats, baseline_repeats = GRID, [torch.float32, torch.bfloat16], 9, 2
    if args.shapes:
        grid = args.shapes
    if args.dtypes:
        dtypes = args.dtypes
    info = aaren.build_info()
    print(f"aaren {info['version']} CPU benchmark: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"ISA {info['cpu_isa_selected']}; medians of {repeats} round{'s' if repeats != 1 else ''} (kernels) / "
          f"{baseline_repeats} run{'s' if baseline_repeats != 1 else ''} (baselines)")
    settings = [f"{name}={os.environ[name]!r}" for name in SETTINGS if name in os.environ]
    if settings:
        print("set in the environment (not the defaults): " + ", ".join(settings))
    if os.environ.get(CHUNKS_VARIABLE):  # overridden per figure (sequence_chunks): say so
        print(f"{CHUNKS_VARIABLE}={os.environ[CHUNKS_VARIABLE]!r} in the environment is not used: "
              "this benchmark sets it itself (the kernels' choice, and 1 for the unsplit columns)")
    print("fwd/bwd: kernels into reused buffers, taking turns call by call with the copy (and with the")
    print("unsplit kernels) in each round; a ratio is the median over rounds of that ratio within a round;")
    print("'scan() ms' allocates its output (alloc+touch shown apart); the copy is Tensor.copy_, while")
    print("the kernels write outputs of 1 MiB per thread or more with streaming stores;")
    print("'bwd after a state / bwd': the same backward after a float64 state, taking turns with the one")
    print("without (a state adds its lse gradient, taken from the inputs in float64);")
    print("the allocating call, alloc+touch and the baselines are each timed on their own, one after another;")
    print("speedups compare aaren.scan through autograd with the baselines through autograd.\n")
    rows = []
    for shape in grid:
        for dtype in dtypes:
            rows.append(measure(*shape, dtype, repeats, baseline_repeats))
            print(f"measured {rows[-1]['shape']} {rows[-1]['dtype']}", flush=True)
    print()
    print_table(rows)
    if args.smoke:
        return smoke_check(rows)
    return 0


def smoke_check(rows):
    """--smoke: the timed kernels compute the scan, and every figure is a positive number."""
    torch.manual_seed(0)
    problems = []
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        scores = torch.randn(2, 100, 3, dtype=dtype) * 3
        values = torch.randn(2, 100, 3, 8, dtype=dtype)
        out = torch.empty_like(values)
        lse = torch.empty(2, 100, 3, dtype=torch.float64)
        final_out = torch.empty(2, 3, 8, dtype=torch.float64)
        torch.ops.aaren.scan_forward_into(scores, values, None, None, out, lse, final_out)
        want = hillis_steele_scan(scores.float(), values.float())
        for name, got in (("scan_forward_into", out), ("aaren.scan", aaren.scan(scores, values)[0])):
            error = (got.float() - want).abs().max().item()
            if not error <= tolerance:
                problems.append(f"{name} {dtype}: max |error| {error:.2e} against hillis_steele_scan")
    for row in rows:
        for key, value in row.items():
            if value is None or (isinstance(value, float) and not (math.isfinite(value) and value > 0)):
                problems.append(f"{row['shape']} {row['dtype']}: {key} = {value}")
    for problem in problems:
        print(f"smoke check FAILED: {problem}")
    if not problems:
        print("smoke check passed: the kernels match the reference scan; every figure is positive and finite")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
