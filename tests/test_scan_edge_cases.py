"""aaren.scan at the edges of its input domain, on every device present: scores of +-1e4 and
large constant offsets (up to +-1e6; forward, backward, and continuation in chunks and steps,
as accurate as plain PyTorch), masked prefixes and fully masked sequences (no NaN, zero
outputs and gradients), masked tokens after a state, empty sequences, and zero batch or heads.
"""
import pytest
import torch

import aaren
from naive import naive_scan, reference_scan
from scan_problems import (ALL_DTYPES, NAMES, check_gradients, dtype_id, gradients,
                           naive_outputs, op_outputs, random_problem, requiring_grad, seeds)
from tolerance import assert_close_to_reference


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_scores_spanning_1e4(device, dtype):
    """Scores of +-1e4 (+ N(0, 1)): in float16 (spacing 8 at 1e4) they round to exactly +-1e4,
    still a valid problem; its inputs, as rounded, are what the reference computes with."""
    scores, values, _ = random_problem(2, 50, 2, 8, dtype=torch.float64, device=device)
    scores = (scores.sign() * 1e4 + scores).to(dtype)
    values = values.to(dtype)
    out, (lse, _) = aaren.scan(scores, values)
    ref, ref_lse = reference_scan(scores, values)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, ref_lse[:, -1], rtol=1e-12, atol=1e-12)
        return
    plain, plain_lse = naive_scan(scores, values, dtype=dtype)
    assert_close_to_reference(out, ref, plain, what="out")
    assert_close_to_reference(lse, ref_lse[:, -1], plain_lse[:, -1], what="lse")


# Large constant offsets: softmax does not change when every score moves by the same amount,
# and plain PyTorch (which subtracts the maximum) is as accurate there as near 0. Scores
# 2 N(0, 1) + offset, rounded to the dtype (float16 cannot hold 1e6).
OFFSETS = [0.0, 1e2, -1e2, 1e4, -1e4, 1e6, -1e6]
OFFSET_CASES = [(dtype, offset) for dtype in ALL_DTYPES for offset in OFFSETS
                if abs(offset) < torch.finfo(dtype).max / 2]
OFFSET_IDS = [f"{dtype_id(dtype)}-{offset:+g}" for dtype, offset in OFFSET_CASES]


def offset_problem(B, N, H, D, dtype, device, offset):
    scores = (2 * torch.randn(B, N, H, dtype=torch.float64) + offset).to(dtype).to(device)
    values = torch.randn(B, N, H, D, dtype=torch.float64).to(dtype).to(device)
    return scores, values


@pytest.mark.parametrize("dtype,offset", OFFSET_CASES, ids=OFFSET_IDS)
def test_backward_large_offset(device, dtype, offset):
    """Forward and backward at scores around +-1e2, +-1e4, +-1e6, as accurate as plain
    PyTorch's: the saved lse must not lose the scores' small differences (a float32 lse
    near 1e4 is only good to 1e-3, an error of 1e-3 in every weight e^(s - L))."""
    scores, values = offset_problem(2, 40, 3, 8, dtype, device, offset)
    grad_out, grad_lse = seeds(values, "out and lse", dtype)
    if dtype == torch.float64:
        # Finite differences at 1e6 are only good to ~1e-4 (the lse's own rounding, 1e-10,
        # over the step 1e-6): the values are the check there, gradcheck up to 1e4.
        ours = gradients(op_outputs, (scores, values), grad_out, grad_lse)
        exact = gradients(naive_outputs(torch.float64), (scores, values), grad_out, grad_lse)
        for name, got, want in zip(NAMES, ours, exact):
            # The lse near |offset| is rounded to eps |offset|, which the weights e^(s - L) inherit.
            tolerance = 64 * torch.finfo(torch.float64).eps * max(abs(offset), 1.0)
            torch.testing.assert_close(got, want, rtol=0, atol=tolerance * want.abs().max().item(),
                                       msg=f"d/d {name}")
        if abs(offset) <= 1e4:
            inputs = requiring_grad(scores[:1, :6, :2], values[:1, :6, :2, :3])
            assert torch.autograd.gradcheck(op_outputs, inputs)
        return
    out, lse = op_outputs(scores, values)
    ref, ref_lse = reference_scan(scores, values)
    plain, plain_lse = naive_scan(scores, values, dtype=dtype)
    assert_close_to_reference(out, ref, plain, what="out")
    assert_close_to_reference(lse, ref_lse, plain_lse, what="lse")
    check_gradients(scores, values, None, grad_out, grad_lse)


@pytest.mark.parametrize("dtype,offset", OFFSET_CASES, ids=OFFSET_IDS)
def test_chunks_and_steps_large_offset(device, dtype, offset):
    """A sequence at a large offset continued in chunks, and token by token, gives what one
    scan of the whole sequence gives: the state carried between calls must keep the lse to
    the accuracy the weights need, and the output unrounded (see the design page)."""
    scores, values = offset_problem(2, 40, 3, 8, dtype, device, offset)
    ref, ref_lse = reference_scan(scores, values)
    plain, plain_lse = naive_scan(scores, values, dtype=dtype)
    state, pieces = None, []
    for start, stop in [(0, 7), (7, 8), (8, 8), (8, 31), (31, 40)]:
        piece, state = aaren.scan(scores[:, start:stop], values[:, start:stop], state)
        pieces.append(piece)
    chunked, chunked_lse = torch.cat(pieces, 1), state[0]
    state, steps = None, []
    for n in range(scores.size(1)):
        y, state = aaren.step(scores[:, n], values[:, n], state)
        steps.append(y)
    stepped, stepped_lse = torch.stack(steps, 1), state[0]
    for name, got, got_lse in [("chunks", chunked, chunked_lse), ("steps", stepped, stepped_lse)]:
        if dtype == torch.float64:
            tolerance = 64 * torch.finfo(torch.float64).eps * max(abs(offset), 1.0)
            torch.testing.assert_close(got, ref, rtol=0, atol=tolerance, msg=name)
            torch.testing.assert_close(got_lse, ref_lse[:, -1], rtol=1e-15, atol=0, msg=name)
        else:
            assert_close_to_reference(got, ref, plain, what=f"{name}: out")
            assert_close_to_reference(got_lse, ref_lse[:, -1], plain_lse[:, -1], what=f"{name}: lse")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_masked_prefix_has_no_nan(device, dtype):
    scores, values, _ = random_problem(2, 8, 3, 4, dtype=dtype, device=device)
    scores[:, :3] = float("-inf")  # the first three tokens are masked everywhere
    scores[1, :, 2] = float("-inf")  # one (batch, head) is masked throughout
    scores, values = requiring_grad(scores, values)
    out, (lse, _) = aaren.scan(scores, values)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    assert torch.isneginf(lse[1, 2]) and torch.isfinite(lse[0]).all()
    (out.float().sum() + lse[0].sum()).backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(values.grad).all()
    assert torch.equal(values.grad[:, :3], torch.zeros_like(values.grad[:, :3]))
    assert torch.equal(scores.grad[:, :3], torch.zeros_like(scores.grad[:, :3]))
    assert torch.equal(values.grad[1, :, 2], torch.zeros_like(values.grad[1, :, 2]))


def test_masked_token_after_state(device):
    scores, values, state = random_problem(2, 4, 3, 5, device=device, with_state=True)
    scores[:] = float("-inf")
    out, (lse, last) = aaren.scan(scores, values, state)
    torch.testing.assert_close(out, state[1].unsqueeze(1).expand_as(out))
    torch.testing.assert_close(lse, state[0])


@pytest.mark.parametrize("with_state", [False, True])
def test_empty_sequence(device, with_state):
    scores, values, state = random_problem(2, 0, 3, 4, device=device, with_state=with_state)
    out, (lse, last) = aaren.scan(scores, values, state)
    assert out.shape == (2, 0, 3, 4)
    if with_state:
        assert torch.equal(lse, state[0]) and torch.equal(last, state[1])
    else:
        assert torch.isneginf(lse).all() and torch.equal(last, torch.zeros(2, 3, 4, dtype=last.dtype, device=device))


def test_empty_sequence_gradient_passes_to_state(device):
    scores, values, state = random_problem(2, 0, 3, 4, device=device, with_state=True)
    lse0, out0 = requiring_grad(*state)
    _, (lse, last) = aaren.scan(scores, values, (lse0, out0))
    (lse.sum() + 2 * last.sum()).backward()
    assert torch.equal(lse0.grad, torch.ones_like(lse0)) and torch.equal(out0.grad, 2 * torch.ones_like(out0))


def test_zero_batch_and_heads(device):
    for shape in [(0, 5, 3, 4), (2, 5, 0, 4)]:
        scores, values, _ = random_problem(*shape, device=device)
        out, (lse, last) = aaren.scan(scores, values)
        assert out.shape == shape and lse.shape == (shape[0], shape[2])
