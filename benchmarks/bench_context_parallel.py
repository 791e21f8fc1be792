"""Context parallelism (aaren.distributed.scan, docs/distributed.md): what it costs.

1. Compute, measured side by side in one run on one chunk (one rank's share of the sequence):
   - plain: `aaren.scan` of the chunk from the empty state (what a single device does);
   - scan + fix-up: what each rank of `aaren.distributed.scan` computes besides the
     communication: the chunk's scan with per-token lse, then the elementwise fix-up of
     every output with the incoming state (aaren.distributed._fix_up, the package's own);
   - fix-up alone;
   - scan from the incoming state (`aaren.scan(..., state)`): what a fix-up fused into the
     kernel would cost (the state enters the accumulators once; no extra pass), so
     "scan + fix-up" minus this is what fusing would save. (It needs the incoming state
     before the scan, i.e. after the all-gather: the unfused order lets the scan run first.)
   Forward alone, and forward + backward. Timed with torch.utils.benchmark (median of
   several runs), single-threaded by default (--threads).

2. Communication per layer and per rank at N = 128k tokens (computed from the shapes, not
   measured): aaren.distributed.scan's all-gather of the B x H x (D + 1) float64 chunk
   summaries forward (and its reduce-scatter backward), against an all-to-all (Ulysses)
   scheme, which re-shards scores [B, N/W, H] and values [B, N/W, H, D] from sequence to
   heads before the scan and the outputs [B, N/W, H, D] back after it (the same volume again
   backward).

    python benchmarks/bench_context_parallel.py            # N = 16384 per chunk: ~1 minute
    python benchmarks/bench_context_parallel.py --smoke    # tiny sizes, seconds
"""
import argparse

import torch
import torch.utils.benchmark as benchmark

import aaren
from aaren.distributed import _fix_up


def measure(fn, min_run_time):
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time).median


def compute(args):
    dtype = getattr(torch, args.dtype)
    b, n, h, d = args.batch, args.chunk, args.heads, args.head_dim
    s = torch.randn(b, n, h, dtype=dtype, requires_grad=True)
    v = torch.randn(b, n, h, d, dtype=dtype, requires_grad=True)
    state = (torch.randn(b, h, dtype=torch.float64), torch.randn(b, h, d, dtype=torch.float64))
    grad = torch.randn(b, n, h, d, dtype=dtype)

    def plain():
        return aaren.scan(s, v)[0]

    def scan_fix_up():
        out, lse, _ = torch.ops.aaren.scan_forward(s, v, None, None)
        return _fix_up(state[0], state[1], lse, out)

    def from_state():
        return aaren.scan(s, v, state)[0]

    with torch.no_grad():
        out, lse, _ = torch.ops.aaren.scan_forward(s, v, None, None)
    fixed = _fix_up(state[0], state[1], lse, out)
    reference = from_state()
    error = (fixed.double() - reference.double()).abs().max().item()
    assert error <= 64 * torch.finfo(dtype).eps * reference.abs().max().item(), error

    rows = []
    for label, fn in (("plain scan", plain), ("scan + fix-up", scan_fix_up),
                      ("fix-up alone", lambda: _fix_up(state[0], state[1], lse, out)),
                      ("scan from the state (fused fix-up)", from_state)):
        with torch.no_grad():
            forward = measure(fn, args.min_run_time)
        if label == "fix-up alone":
            both = float("nan")
        else:
            def train(fn=fn):
                s.grad = v.grad = None
                fn().backward(grad)
            both = measure(train, args.min_run_time)
        rows.append((label, forward, both))
    base_f, base_b = rows[0][1], rows[0][2]
    print(f"\n1. compute per rank: B={b}, chunk N={n}, H={h}, D={d}, {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), CPU (median, ms; ratio to the plain scan)")
    print(f"   {'':38s} {'forward':>10s} {'ratio':>6s} {'fwd+bwd':>10s} {'ratio':>6s}")
    for label, f, fb in rows:
        print(f"   {label:38s} {f * 1e3:10.2f} {f / base_f:6.2f} {fb * 1e3:10.2f} {fb / base_b:6.2f}")
    fused_saving = rows[1][1] - rows[3][1]
    print(f"   a fix-up fused into the scan would save {fused_saving * 1e3:.2f} ms of "
          f"{rows[1][1] * 1e3:.2f} ms forward ({fused_saving / rows[1][1]:.0%}); fix-up vs. "
          f"scan from the state agree to {error:.1e}")


def communication(args):
    n, b, h, d = args.tokens, args.batch, args.heads, args.head_dim
    act = torch.finfo(getattr(torch, args.comm_dtype)).bits // 8
    print(f"\n2. communication per layer and rank, forward (backward: the same again): "
          f"N={n}, B={b}, H={h}, D={d}, activations in {args.comm_dtype} ({act} B), "
          f"state float64 (computed from the shapes)")
    print(f"   {'W':>4s} {'aaren all-gather':>18s} {'Ulysses all-to-all':>20s} {'ratio':>12s}")
    for w in (2, 4, 8, 16, 64):
        # all-gather: each rank sends its summary, receives W - 1 others
        ours = 2 * (w - 1) * b * h * (d + 1) * 8  # sent + received
        # all-to-all: scores + values there, outputs back; each rank keeps 1/W of its chunk
        chunk = n // w
        moved = (w - 1) / w * b * chunk * h * ((1 + d) + d) * act
        ulysses = 2 * moved  # sent + received
        print(f"   {w:4d} {ours / 1024:15.1f} KiB {ulysses / 2**20:17.1f} MiB {ulysses / ours:12,.0f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=16384, help="tokens per rank (timed)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=128 * 1024, help="N for the byte counts")
    parser.add_argument("--comm-dtype", default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.chunk, args.heads, args.head_dim, args.min_run_time = 256, 2, 8, 0.05
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    compute(args)
    communication(args)


if __name__ == "__main__":
    main()
