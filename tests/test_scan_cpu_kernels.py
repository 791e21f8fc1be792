"""CPU-only checks of the scan kernels: with enough work to run on two threads, forward and
backward give the one-thread results bit for bit and stay within tolerance.py's rule against
the float64 reference; and each bfloat16 output is the float32 walk's, rounded as PyTorch
rounds, bit for bit (subnormals, overflow to infinity, infinities and NaN included).
"""
import pytest
import torch

from naive import naive_scan, reference_scan
from scan_problems import (ALL_DTYPES, NAMES, dtype_id, gradients, mixed_problem, naive_outputs,
                           op_outputs, seeds)
from tolerance import assert_close_to_reference


# ---------------------------------------------------------------- threads

def cpu_task_split(threads, B, N, H, D):
    """plan_work in csrc/ops/cpu/work_plan.cpp, for sequences it does not split: (tasks,
    grain). at::parallel_for runs tasks on more than one thread only when tasks > grain (and
    then on min(threads, ceil(tasks / grain)) of them)."""
    wanted = 1 if threads == 1 else 2 * threads
    tasks_per_batch = min(max(-(-wanted // max(B, 1)), 1), max(H, 1))
    heads_per_task = -(-H // tasks_per_batch)
    tasks = B * -(-H // heads_per_task)
    grain = max(1, (1 << 15) // max(1, N * heads_per_task * max(D, 1)))
    return tasks, grain


# (B, N, H, D): many batches of whole heads (one task per batch), and two batches split
# into runs of heads (tasks start mid-way through the heads).
PARALLEL_SHAPES = [(32, 32, 6, 8), (2, 96, 12, 32)]


@pytest.mark.parametrize("shape", PARALLEL_SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_forward_and_backward_on_two_threads(dtype, shape):
    """Enough work for the CPU kernels to run on 2 threads, with every kind of score: the
    same results as on one thread (bit for bit), and within the rule against the reference."""
    B, N, H, D = shape
    tasks, grain = cpu_task_split(2, B, N, H, D)
    assert tasks > grain, (tasks, grain)  # else at::parallel_for runs inline
    scores, values, state = mixed_problem(B, N, D, dtype, "cpu", with_state=True, H=H)
    inputs = (scores, values, *state)
    grad_out, grad_lse = seeds(values, "out and lse", dtype)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = [*op_outputs(*inputs), *gradients(op_outputs, inputs, grad_out, grad_lse)]
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[1], results[2]):
        assert torch.equal(one, two)
    out, lse, *grads = results[2]
    ref, ref_lse = reference_scan(scores, values, state)
    exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse, lambda t: t.double())
    if dtype == torch.float64:
        for got, want in zip([out, lse, *grads], [ref, ref_lse, *exact]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * want[torch.isfinite(want)].abs().max().item())
        return
    plain, plain_lse = naive_scan(scores, values, state, dtype=dtype)
    assert_close_to_reference(out, ref, plain, what="out")
    assert_close_to_reference(lse, ref_lse, plain_lse, what="lse")
    baseline = gradients(naive_outputs(dtype), inputs, grad_out, grad_lse, lambda t: t.to(dtype))
    for name, got, want, plain_grad in zip(NAMES, grads, exact, baseline):
        assert_close_to_reference(got, want, plain_grad, what=f"d/d {name}")


@pytest.mark.parametrize("shape", [(2, 40, 3, 70), (1, 600, 1, 32)])
def test_bfloat16_outputs_are_the_float32_walk_rounded(shape):
    """bfloat16 runs the walk in float32 (its numerator w a float32 row: float32 values sum
    theirs in float64, combine.h, "The forward's running sums") and rounds each output to
    nearest even as PyTorch rounds: bit for bit, whichever conversion the selected
    instruction set stores with (AVX512_BF16 has its own instruction, which flushes
    subnormals; values in that range are here, as are sums that overflow to infinity,
    infinities and NaN). With every score equal every weight is exactly 1, so the walk is a
    float32 running sum times 1/u (u = k in float64, its reciprocal rounded to float32), which
    the test redoes in PyTorch; the state's out is that sum times 1/N in float64. With random
    scores, lse is the float32 kernel's, bit for bit (u is float64 in both)."""
    B, N, H, D = shape
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(B, N, H, D, generator=generator)
    values[..., 0] = 3e-39       # a bfloat16 subnormal
    values[..., 1] = -1.5e-38    # near the smallest normal
    values[..., 2] = 3.39e38     # near the largest: a sum of two overflows to infinity
    values[0, 1, 0, 3] = float("inf")
    values[0, 2, 0, 4] = float("nan")
    values = values.bfloat16()
    out, _, final_out = torch.ops.aaren.scan_forward(torch.zeros(B, N, H).bfloat16(), values,
                                                     None, None)
    running = torch.zeros(B, H, D)
    want = []
    for k in range(N):
        running = running + values[:, k].float()
        inverse = torch.tensor(1.0 / (k + 1), dtype=torch.float64).float()
        want.append((running * inverse).bfloat16())
    torch.testing.assert_close(out, torch.stack(want, 1), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(final_out, running.double() * (1.0 / N), rtol=0, atol=0,
                               equal_nan=True)
    assert (out[..., 0] != 0).all()  # subnormals kept, not flushed
    assert out[..., 2].isinf().any() and out.isnan().any()

    scores = torch.randn(B, N, H, generator=generator).bfloat16()
    lse = torch.ops.aaren.scan_forward(scores, values, None, None)[1]
    assert torch.equal(lse, torch.ops.aaren.scan_forward(scores.float(), values.float(), None, None)[1])
