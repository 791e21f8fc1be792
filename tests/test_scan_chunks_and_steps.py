"""Continuing a scan from its state, on every device present: a sequence scanned in chunks
(empty ones included) or token by token with aaren.step gives what one scan of the whole
sequence gives, forward and backward (the state's gradient carried from step to step,
against the float64 reference within tolerance.py's rule).
"""
import pytest
import torch

import aaren
from naive import naive_scan
from scan_problems import (ALL_DTYPES, KINDS, NAMES, dtype_id, gradients, mixed_problem,
                           random_problem, requiring_grad, seeds)
from tolerance import assert_close_to_reference


# ---------------------------------------------------------------- state, chunks and steps

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_chunked_continuation_equals_whole(device, dtype):
    scores, values, _ = random_problem(2, 40, 3, 16, dtype=dtype, device=device)
    whole, (lse, last) = aaren.scan(scores, values)
    state, pieces = None, []
    for start, stop in [(0, 7), (7, 8), (8, 8), (8, 31), (31, 40)]:
        piece, state = aaren.scan(scores[:, start:stop], values[:, start:stop], state)
        pieces.append(piece)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(state[0], lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[1], last, rtol=tolerance, atol=tolerance)


def test_chunked_continuation_gradients(device):
    scores, values, _ = random_problem(2, 12, 3, 4, device=device)
    whole = requiring_grad(scores, values)
    out, (lse, _) = aaren.scan(*whole)
    (out.sin().sum() + lse.sum()).backward()
    split = requiring_grad(scores, values)
    first, state = aaren.scan(split[0][:, :5], split[1][:, :5])
    second, (lse2, _) = aaren.scan(split[0][:, 5:], split[1][:, 5:], state)
    (torch.cat([first, second], 1).sin().sum() + lse2.sum()).backward()
    torch.testing.assert_close(split[0].grad, whole[0].grad)
    torch.testing.assert_close(split[1].grad, whole[1].grad)


def streamed_outputs(scores, values, lse0, out0):
    """aaren.step over every token in turn: (out [B, N, H, D], the final lse [B, H])."""
    state, outputs = (lse0, out0), []
    for n in range(scores.size(1)):
        y, state = aaren.step(scores[:, n], values[:, n], state)
        outputs.append(y)
    return torch.stack(outputs, 1), state[0]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_step_stream_gradients(device, dtype):
    """The backward through a chain of steps (each a one-token scan backward, the state's
    gradient carried from step to step) on every kind of score: jumps of 100 between the
    state and the next token, masked tokens and a masked prefix, against the reference over
    the whole sequence."""
    scores, values, state = mixed_problem(2, 12, 4, dtype, device, with_state=True)
    inputs = (scores, values, *state)
    grad_out, _ = seeds(values, "out only", dtype)
    grad_lse = torch.randn(2, len(KINDS), dtype=torch.float64).to(dtype).double().to(device)

    def reference(fn_dtype):
        def outputs(scores, values, lse0, out0):
            out, lse = naive_scan(scores, values, (lse0, out0), dtype=fn_dtype)
            return out, lse[:, -1]
        return outputs

    ours = gradients(streamed_outputs, inputs, grad_out, grad_lse)
    exact = gradients(reference(torch.float64), inputs, grad_out, grad_lse, lambda t: t.double())
    if dtype == torch.float64:
        for name, got, want in zip(NAMES, ours, exact):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * want.abs().max().item(),
                                       msg=f"d/d {name}")
        return
    plain = gradients(reference(dtype), inputs, grad_out, grad_lse, lambda t: t.to(dtype))
    for name, got, want, baseline in zip(NAMES, ours, exact, plain):
        assert_close_to_reference(got, want, baseline, what=f"d/d {name}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_step_by_step_equals_scan(device, dtype):
    scores, values, _ = random_problem(3, 20, 2, 8, dtype=dtype, device=device)
    scores[:, :2, 0] = float("-inf")
    whole, (lse, _) = aaren.scan(scores, values)
    state, steps = None, []
    for n in range(scores.size(1)):
        y, state = aaren.step(scores[:, n], values[:, n], state)
        steps.append(y)
        assert state[0].shape == (3, 2) and state[1].shape == (3, 2, 8)
    # The step's state is normalized (lse, out) while the scan sums unnormalized: rounding differs.
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    torch.testing.assert_close(torch.stack(steps, 1), whole, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(state[0], lse, rtol=1e-5, atol=1e-5)
