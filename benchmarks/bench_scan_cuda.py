"""Benchmark of aaren's CUDA kernels: scan forward, backward and step.

For each configuration it reports the median time (torch.cuda.Event, after warmup),
the achieved memory bandwidth (bytes the operation must move: forward reads scores
and values and writes out and lse; backward reads grad_out, scores, values, out and
lse and writes grad_values and grad_scores), and ratios against
  - a device-to-device copy moving the same bytes (the physical limit: ~1 is ideal),
  - causal scaled_dot_product_attention with the same query at every position (one
    learned query per head, expanded; what Aaren replaces), forward and forward+backward,
  - a pure-PyTorch Hillis-Steele log-depth scan with the same combine operator.
Step (one token, B in {1, 8, 64}) is compared with a tiny elementwise launch.

    python benchmarks/bench_scan_cuda.py [--quick]

Prints markdown tables. Needs a CUDA GPU and aaren built with CUDA.
"""
import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from aaren.reference import hillis_steele_scan

BENCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def time_ms(fn, warmup, reps):
    """Median milliseconds of fn() on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_ms(nbytes, warmup, reps):
    """A device-to-device copy that moves nbytes in all (reads nbytes/2, writes nbytes/2)."""
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), warmup, reps)


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def make_inputs(B, N, H, D, dtype, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(B, N, H, device="cuda", dtype=torch.float32, generator=gen).to(dtype)
    values = torch.randn(B, N, H, D, device="cuda", dtype=torch.float32, generator=gen).to(dtype)
    return scores.requires_grad_(requires_grad), values.requires_grad_(requires_grad)


def scan_bytes(B, N, H, D, dtype):
    e = torch.tensor([], dtype=dtype).element_size()
    tokens = B * N * H
    forward = tokens * e + tokens * D * e + tokens * D * e + tokens * 8  # s, v in; out, lse (f64) out
    backward = tokens * D * e * 3 + tokens * e + tokens * 8 + tokens * D * e + tokens * e
    return forward, backward


def sdpa_backend(dtype):
    from torch.nn.attention import SDPBackend
    return SDPBackend.FLASH_ATTENTION if dtype in (torch.float16, torch.bfloat16) \
        else SDPBackend.EFFICIENT_ATTENTION


def sdpa_inputs(B, N, H, D, dtype, requires_grad):
    """Causal attention with one learned query per head, the same at every position."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    query = torch.randn(H, D, device="cuda", generator=gen).to(dtype).requires_grad_(requires_grad)
    k = torch.randn(B, H, N, D, device="cuda", generator=gen).to(dtype).requires_grad_(requires_grad)
    v = torch.randn(B, H, N, D, device="cuda", generator=gen).to(dtype).requires_grad_(requires_grad)
    return query, k, v


def sdpa_times(B, N, H, D, dtype, warmup, reps):
    """(forward ms, forward+backward ms, backend name), None where it cannot run."""
    from torch.nn.attention import sdpa_kernel
    backend = sdpa_backend(dtype)
    query, k, v = sdpa_inputs(B, N, H, D, dtype, requires_grad=True)

    def q_of(query):
        q = query.view(1, H, 1, D).expand(B, H, N, D)
        return q

    def forward(q_layout):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q_layout(query), k, v, is_causal=True)

    layouts = [("expanded q", q_of), ("contiguous q", lambda qq: q_of(qq).contiguous())]
    for name, layout in layouts:
        try:
            with torch.no_grad():
                forward(layout)
            chosen = layout
            break
        except RuntimeError:
            continue
    else:
        return None, None, f"{backend.name} unavailable"
    grad = torch.randn(B, H, N, D, device="cuda", dtype=dtype)

    def fwd():
        with torch.no_grad():
            forward(chosen)

    def fwd_bwd():
        out = forward(chosen)
        torch.autograd.grad(out, (query, k, v), grad)

    fwd_ms = time_ms(fwd, warmup, reps)
    fwd_bwd_ms = time_ms(fwd_bwd, warmup, reps)
    return fwd_ms, fwd_bwd_ms, f"{backend.name.lower()} ({name})"


def sdpa_affordable(B, N, H, D, dtype, reps, budget_s):
    """Causal attention is O(N^2 D): skip it where the estimate exceeds the time budget."""
    flops = 4.0 * B * H * N * N * D / 2 * 3.5  # forward + backward
    rate = 300e12 if dtype in (torch.float16, torch.bfloat16) else 30e12
    return flops / rate * (reps + 2) < budget_s


def hillis_steele_affordable(B, N, H, D):
    # ~ a dozen float32 copies of the values alive at once
    need = 12 * B * N * H * D * 4
    free, _ = torch.cuda.mem_get_info()
    return need < free * 0.8


def bench_scan(aaren, B, N, H, D, dtype, args):
    warmup, reps = args.warmup, args.reps
    fwd_bytes, bwd_bytes = scan_bytes(B, N, H, D, dtype)
    row = {"dtype": str(dtype).replace("torch.", ""), "B": B, "N": N, "H": H, "D": D}

    scores, values = make_inputs(B, N, H, D, dtype)
    row["fwd"] = time_ms(lambda: aaren.scan(scores, values), warmup, reps)
    out, lse, _ = torch.ops.aaren.scan_forward(scores, values, None, None)
    grad_out = torch.randn_like(out)
    row["bwd"] = time_ms(lambda: torch.ops.aaren.scan_backward(
        grad_out, None, scores, values, out, lse, None, None), warmup, reps)
    del out, lse

    scores_g, values_g = make_inputs(B, N, H, D, dtype, requires_grad=True)

    def fwd_bwd():
        o, _ = aaren.scan(scores_g, values_g)
        torch.autograd.grad(o, (scores_g, values_g), grad_out)
    row["fwd_bwd"] = time_ms(fwd_bwd, warmup, reps)
    del scores_g, values_g

    row["fwd_gbs"] = fwd_bytes / (row["fwd"] * 1e-3) / 1e9
    row["bwd_gbs"] = bwd_bytes / (row["bwd"] * 1e-3) / 1e9
    row["fwd_copy"] = row["fwd"] / copy_ms(fwd_bytes, warmup, reps)
    row["bwd_copy"] = row["bwd"] / copy_ms(bwd_bytes, warmup, reps)

    row["sdpa_fwd"] = row["sdpa_fwd_bwd"] = None
    row["sdpa_backend"] = "skipped (too slow)"
    if sdpa_affordable(B, N, H, D, dtype, reps, args.sdpa_budget):
        try:
            row["sdpa_fwd"], row["sdpa_fwd_bwd"], row["sdpa_backend"] = sdpa_times(
                B, N, H, D, dtype, warmup, reps)
        except torch.OutOfMemoryError:
            row["sdpa_backend"] = "out of memory"
        torch.cuda.empty_cache()

    row["hs_fwd"] = None
    if hillis_steele_affordable(B, N, H, D):
        try:
            row["hs_fwd"] = time_ms(lambda: hillis_steele_scan(scores, values),
                                    1, max(1, reps // 2))
        except torch.OutOfMemoryError:
            pass
        torch.cuda.empty_cache()
    return row


def bench_step(aaren, B, H, D, dtype, args):
    calls = args.step_calls
    gen = torch.Generator(device="cuda").manual_seed(2)
    score = torch.randn(B, H, device="cuda", generator=gen).to(dtype)
    value = torch.randn(B, H, D, device="cuda", generator=gen).to(dtype)
    state = aaren.step(score, value)[1]

    def steps():
        s = state
        for _ in range(calls):
            _, s = aaren.step(score, value, s)

    tiny = torch.ones(4, device="cuda")

    def adds():
        for _ in range(calls):
            torch.add(tiny, tiny)

    step_ms = time_ms(steps, args.warmup, args.reps) / calls
    add_ms = time_ms(adds, args.warmup, args.reps) / calls
    return {"dtype": str(dtype).replace("torch.", ""), "B": B, "H": H, "D": D,
            "step": step_ms, "add": add_ms}


def sanity_check(aaren):
    """CUDA against the CPU kernels on small inputs (forward and backward)."""
    rows = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for (B, N, H, D) in ((2, 1, 3, 64), (2, 777, 3, 64), (1, 5000, 2, 257)):
            gen = torch.Generator().manual_seed(3)
            scores = (torch.randn(B, N, H, generator=gen) * 3)
            scores[:, : N // 3, 0] = float("-inf")  # an all-masked prefix in head 0
            scores = scores.to(dtype)
            values = torch.randn(B, N, H, D, generator=gen).to(dtype)
            grad_out = torch.randn(B, N, H, D, generator=gen).to(dtype)
            grad_lse = torch.randn(B, N, H, generator=gen, dtype=torch.float64)
            cpu = torch.ops.aaren.scan_forward(scores, values, None, None)
            gpu = torch.ops.aaren.scan_forward(scores.cuda(), values.cuda(), None, None)
            cpu_g = torch.ops.aaren.scan_backward(grad_out, grad_lse, scores, values, cpu[0], cpu[1],
                                                  None, None)
            gpu_g = torch.ops.aaren.scan_backward(grad_out.cuda(), grad_lse.cuda(), scores.cuda(),
                                                  values.cuda(), cpu[0].cuda(), cpu[1].cuda(),
                                                  None, None)
            worst = 0.0
            exact = True
            for a, b in zip(list(cpu) + list(cpu_g[:2]), list(gpu) + list(gpu_g[:2])):
                a, b = a.double(), b.cpu().double()
                finite = a.isfinite()
                exact &= bool(torch.equal(a.isfinite(), b.isfinite()))
                exact &= bool(((a == 0) & finite).eq((b == 0) & finite).all())
                scale = a[finite].abs().max().clamp(min=1) if finite.any() else 1
                worst = max(worst, float(((a - b).abs()[finite] / scale).max()) if finite.any() else 0)
            rows.append((str(dtype).replace("torch.", ""), f"{B}x{N}x{H}x{D}", worst,
                         "ok" if worst < tol and exact else "MISMATCH"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--no-check", action="store_true", help="skip the CUDA-vs-CPU check")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_scan_cuda: no CUDA device available; nothing to benchmark.")
        return 0
    import aaren
    try:
        torch.ops.aaren.scan_forward(torch.zeros(1, 1, 1, device="cuda"),
                                     torch.zeros(1, 1, 1, 1, device="cuda"), None, None)
    except (RuntimeError, NotImplementedError) as e:
        print(f"bench_scan_cuda: aaren has no CUDA kernels in this build ({e}).")
        return 1

    args.warmup = 2 if args.quick else 5
    args.reps = 5 if args.quick else 20
    args.step_calls = 50 if args.quick else 200
    args.sdpa_budget = 10.0 if args.quick else 60.0
    lengths = (4096, 16384) if args.quick else (4096, 16384, 65536)
    long_n = 1 << 18 if args.quick else 1 << 20

    props = torch.cuda.get_device_properties(0)
    print(f"# aaren CUDA scan benchmark\n\nGPU: {props.name} ({props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
          f"aaren {aaren.__version__}\n")

    if not args.no_check:
        print("## CUDA vs CPU kernels (max error relative to the largest value; exact zeros "
              "and infinities must match)\n")
        print("| dtype | B x N x H x D | max rel. error | result |\n|---|---|---|---|")
        for dtype, shape, err, ok in sanity_check(aaren):
            print(f"| {dtype} | {shape} | {err:.2e} | {ok} |")
        print()

    configs = [(8, n, 16, 64) for n in lengths] + [(1, long_n, 1, 64)]
    rows = []
    for dtype in BENCH_DTYPES.values():
        for (B, N, H, D) in configs:
            rows.append(bench_scan(aaren, B, N, H, D, dtype, args))
            torch.cuda.empty_cache()

    print("## Scan (time per call; GB/s = bytes that must move / time; x copy = time / "
          "time of a copy moving the same bytes)\n")
    print("| dtype | B | N | H | D | fwd | fwd GB/s | fwd x copy | bwd (op) | bwd GB/s | "
          "bwd x copy | fwd+bwd (autograd) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['B']} | {r['N']} | {r['H']} | {r['D']} | {fmt_ms(r['fwd'])} | "
              f"{r['fwd_gbs']:.0f} | {fmt_ratio(r['fwd_copy'])} | {fmt_ms(r['bwd'])} | "
              f"{r['bwd_gbs']:.0f} | {fmt_ratio(r['bwd_copy'])} | {fmt_ms(r['fwd_bwd'])} |")

    print("\n## Against causal SDPA (one query per head, expanded to every position) and a "
          "pure-PyTorch Hillis-Steele scan (speedup = their time / aaren's)\n")
    print("| dtype | B | N | H | D | SDPA fwd | speedup | SDPA fwd+bwd | speedup | SDPA kernel | "
          "Hillis-Steele fwd | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp_f = r["sdpa_fwd"] / r["fwd"] if r["sdpa_fwd"] else None
        sp_fb = r["sdpa_fwd_bwd"] / r["fwd_bwd"] if r["sdpa_fwd_bwd"] else None
        sp_hs = r["hs_fwd"] / r["fwd"] if r["hs_fwd"] else None
        print(f"| {r['dtype']} | {r['B']} | {r['N']} | {r['H']} | {r['D']} | "
              f"{fmt_ms(r['sdpa_fwd'])} | {fmt_ratio(sp_f)} | {fmt_ms(r['sdpa_fwd_bwd'])} | "
              f"{fmt_ratio(sp_fb)} | {r['sdpa_backend']} | {fmt_ms(r['hs_fwd'])} | "
              f"{fmt_ratio(sp_hs)} |")

    print("\n## Step (one token; H = 16, D = 64; time per call from Python, launch-bound)\n")
    print("| dtype | B | aaren.step | torch.add (4 elements) | ratio |\n|---|---|---|---|---|")
    for dtype in BENCH_DTYPES.values():
        for B in (1, 8, 64):
            r = bench_step(aaren, B, 16, 64, dtype, args)
            print(f"| {r['dtype']} | {B} | {fmt_ms(r['step'])} | {fmt_ms(r['add'])} | "
                  f"{fmt_ratio(r['step'] / r['add'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
