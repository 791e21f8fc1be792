"""The CPU backward's walk over a task's lanes (csrc/ops/cpu/backward_lanes.h): each lane's
weights e^(r - L) and e^(s - r) are taken a block of tokens at a time, as one vector, while
the walk goes on. How many lanes a task has depends on the thread count
(csrc/ops/cpu/work_plan.cpp), so a lane's gradients must not depend on its task's other
lanes, or they would change with torch.set_num_threads.

As test_cpu_forward_lanes: B = 1 and H = 16, never split into chunks, on 1, 2, 4 and 8
threads (one task of 16 lanes down to sixteen of one), on the build this CPU selects and
again, in a fresh process, on the lower builds it can run.
"""
import pytest
import torch

import aaren  # noqa: F401  (registers torch.ops.aaren)
from lower_isa import CAPABILITIES, rerun_on
from test_cpu_forward_lanes import SHAPES, THREADS, bits, never_split, on_threads  # noqa: F401 (fixture)
from scan_problems import ALL_DTYPES, NAMES, dtype_id, gradients, mixed_problem, naive_outputs, op_outputs, seeds
from tolerance import assert_close_to_reference


@pytest.mark.parametrize("with_state", [False, True], ids=["no state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_same_gradient_bits_on_any_thread_count(dtype, shape, with_state):
    """Every kind of score (masked -inf tokens, whose gradients are zero; maxima that move;
    levels far apart, which lower the backward's reference), one head with +inf and one with
    a NaN, and a state or none: d/d scores, values and the state are the same bytes on 1, 2, 4
    and 8 threads, and close to autograd through the float64 reference."""
    B, N, H, D = shape
    scores, values, state = mixed_problem(B, N, D, dtype, "cpu", with_state, H=H)
    scores[0, N // 2, 7] = float("inf")
    scores[0, N // 3, 8] = float("nan")
    grad_out, grad_lse = seeds(values, "out and lse", dtype)
    inputs = (scores, values, *(state or ()))
    results = {threads: on_threads(threads, gradients, op_outputs, inputs, grad_out, grad_lse)
               for threads in THREADS}
    for threads in THREADS[1:]:
        for name, one, many in zip(NAMES, results[1], results[threads]):
            assert torch.equal(bits(one), bits(many)), f"d/d {name}, {threads} threads"

    # The NaN head's d/d scores: NaN up to its NaN (every output from it on depends on it),
    # but exactly zero at tokens masked so far (lse = -inf: every score up to them is -inf).
    lse = op_outputs(*inputs)[1][0, :N // 3 + 1, 8]
    head_grad = results[1][0][0, :N // 3 + 1, 8]
    masked = lse == float("-inf")
    assert head_grad[~masked].isnan().all() and (head_grad[masked] == 0).all()
    finite = [h for h in range(H) if h not in (7, 8)]
    head_inputs = (scores[..., finite], values[..., finite, :])
    if state is not None:
        head_inputs += (state[0][:, finite], state[1][:, finite])
    head_seeds = (grad_out[..., finite, :], grad_lse[..., finite])
    exact = gradients(naive_outputs(torch.float64), head_inputs, *head_seeds, lambda t: t.double())
    got = [results[1][0][..., finite], results[1][1][..., finite, :]]
    if state is not None:
        got += [results[1][2][:, finite], results[1][3][:, finite]]
    if dtype == torch.float64:
        for name, mine, want in zip(NAMES, got, exact):
            scale = want[torch.isfinite(want)].abs().max().item()
            torch.testing.assert_close(mine, want, rtol=0, atol=1e-10 * scale, msg=f"d/d {name}")
        return
    plain = gradients(naive_outputs(dtype), head_inputs, *head_seeds, lambda t: t.to(dtype))
    for name, mine, want, plain_grad in zip(NAMES, got, exact, plain):
        assert_close_to_reference(mine, want, plain_grad, what=f"d/d {name}")


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_lower_instruction_sets_give_the_same_bits(capability):
    """This file's other tests on the AVX2 build (8 floats to a vector) and the DEFAULT one,
    in a fresh process with ATEN_CPU_CAPABILITY lowered: aaren lowers its choice alike."""
    rerun_on(capability, __file__, "lower_instruction_sets")
