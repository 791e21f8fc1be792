"""A short run of every CUDA kernel of aaren, for compute-sanitizer (scripts/gpu_check.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --kernel-name kns=chunk_kernel --error-exitcode 1 python3 scripts/gpu_sanitize.py

Every case runs the forward and the backward (through autograd, gradients of the outputs and
of the final lse, with and without an initial state) on the GPU and compares them with the CPU
kernels, so it also fails on wrong results. The cases cover the kernels' variants: each dtype
(float64, float32, bfloat16, float16), vector widths 1, 2 and 4 (D = 1, 8, 64, 128 half, 257
over several warps, a misaligned slice), ragged tiles (N not a multiple of 32), one token
(step), unchunked plans (many sequences, or N < 128), the split-N plan (one sequence of a few
thousand tokens), summary levels that are themselves split (one sequence of 200 003 tokens),
masked (-inf) scores and masked prefixes. The caching allocator is off
(PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that an access past a tensor's end is not hidden inside
a cached block. `--list` prints the cases.
"""
import argparse
import sys
import time

import torch

import aaren

# (B, N, H, D, dtype, with_state, masked fraction, layout)
CASES = [
    (2, 5, 3, 1, torch.float32, False, 0.0, "contiguous"),      # N < one tile, vec 1
    (2, 77, 3, 8, torch.float64, True, 0.3, "contiguous"),      # float64, state, masks
    (2, 1, 4, 64, torch.float32, True, 0.0, "contiguous"),      # one token (step's shape)
    (3, 300, 2, 64, torch.bfloat16, False, 0.2, "contiguous"),  # bf16 vec 2
    (2, 200, 2, 128, torch.float16, True, 0.0, "contiguous"),   # half vec 4
    (1, 1000, 1, 257, torch.float32, True, 0.1, "contiguous"),  # several warps per sequence, split N
    (64, 300, 32, 16, torch.float32, False, 0.0, "contiguous"), # many sequences: unchunked
    (2, 500, 3, 64, torch.float32, True, 0.0, "misaligned"),    # a slice one element off: vec 1
    (1, 4099, 1, 64, torch.bfloat16, True, 0.0, "contiguous"),  # split N, ragged last chunk
    (1, 200_003, 1, 8, torch.float32, False, 0.0, "contiguous"),  # split N, split summaries
    (1, 3000, 2, 8, torch.float32, False, 1.0, "prefix"),       # a masked prefix of 2000 tokens
]


def make_inputs(B, N, H, D, dtype, with_state, masked, layout, generator):
    scores = torch.randn(B, N, H, generator=generator).mul_(3)
    if masked >= 1.0:  # "prefix": every score of the first two thirds masked
        scores[:, : 2 * N // 3] = float("-inf")
    elif masked:
        scores = scores.masked_fill(torch.rand(B, N, H, generator=generator) < masked, float("-inf"))
    # "misaligned": values are a slice [..., 1:] of a wider tensor (made on each device)
    values = torch.randn(B, N, H, D + (layout == "misaligned"), generator=generator)
    state = None
    if with_state:
        state = (torch.randn(B, H, generator=generator, dtype=torch.float64),  # the state: float64
                 torch.randn(B, H, D, generator=generator, dtype=torch.float64))
    return scores.to(dtype), values.to(dtype), state


def run(scores, values, state, layout, device):
    values = values.to(device)
    if layout == "misaligned":
        values = values[..., 1:]
    leaves = [t.detach().to(device).requires_grad_() for t in (scores, values, *(state or ()))]
    out, (lse, last) = aaren.scan(leaves[0], leaves[1], tuple(leaves[2:]) or None)
    finite_lse = torch.where(lse.isfinite(), lse, torch.zeros_like(lse))
    (out.float().square().mean() + finite_lse.float().sum() + last.float().sum()).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return [out, lse] + [leaf.grad for leaf in leaves]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args()
    if args.list:
        for case in CASES:
            print(case)
        return 0
    if not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device")
        return 2
    if not aaren.build_info()["cuda"]:
        print("gpu_sanitize: aaren was built without CUDA kernels")
        return 2
    generator = torch.Generator().manual_seed(0)
    failures = 0
    for case in CASES:
        B, N, H, D, dtype, with_state, masked, layout = case
        start = time.time()
        scores, values, state = make_inputs(*case, generator)
        want = run(scores, values, state, layout, "cpu")
        got = run(scores, values, state, layout, "cuda")
        tolerance = {torch.float64: 1e-9, torch.float32: 1e-3}.get(dtype, 5e-2)
        worst = 0.0
        for g, w in zip(got, want):
            g, w = g.detach().cpu().double(), w.detach().double()
            same_pattern = torch.equal(g.isfinite(), w.isfinite())
            finite = w.isfinite()
            scale = w[finite].abs().max().clamp(min=1).item() if finite.any() else 1.0
            error = ((g - w).abs()[finite].max().item() / scale) if finite.any() else 0.0
            worst = max(worst, error if same_pattern else float("inf"))
        ok = worst <= tolerance
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} B={B} N={N} H={H} D={D} {str(dtype)[6:]} state={with_state} "
              f"masked={masked} {layout}: max rel. error {worst:.1e} (tolerance {tolerance:.0e}), "
              f"{time.time() - start:.1f} s", flush=True)
    print(f"gpu_sanitize: {len(CASES) - failures} of {len(CASES)} cases agree with the CPU kernels")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
