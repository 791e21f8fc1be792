"""aaren.scan's forward values against an independent float64 reference, on every device
present: float64 to 1e-12, the low-precision dtypes within tolerance.py's rule (a small
multiple of plain PyTorch's own error in the same dtype, naive.py run in that dtype) on
random and on "mixed" problems (scores taking every branch of the kernels), the state's
dtypes, the Hillis-Steele baseline, strided and sliced input layouts read in place, and a
200,000-token sequence computed as a streaming pass.
"""
import math

import pytest
import torch

import aaren
from aaren.reference import hillis_steele_scan
from naive import naive_scan, reference_scan
from scan_problems import (ALL_DTYPES, LOW_PRECISION, dtype_id, mixed_problem, op_outputs,
                           random_problem, requiring_grad, scan_outputs)
from tolerance import assert_close_to_reference


# ---------------------------------------------------------------- forward values

@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", [(2, 7, 3, 5), (1, 1, 1, 1), (3, 33, 2, 64), (2, 16, 4, 17)])
def test_forward_matches_reference_float64(device, shape, with_state):
    scores, values, state = random_problem(*shape, device=device, with_state=with_state)
    out, (lse, last) = aaren.scan(scores, values, state)
    ref_out, ref_lse = reference_scan(scores, values, state)
    assert out.shape == values.shape and out.dtype == values.dtype
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse[:, -1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, ref_out[:, -1])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_forward_low_precision_within_plain_pytorch_error(device, dtype):
    scores, values, state = random_problem(2, 300, 4, 64, dtype=dtype, device=device, scale=3.0,
                                           with_state=True)
    out, (lse, last) = aaren.scan(scores, values, state)
    assert out.dtype == dtype
    ref, ref_lse = reference_scan(scores, values, state)
    plain, plain_lse = naive_scan(scores, values, state, dtype=dtype)
    assert_close_to_reference(out, ref, plain, what="out")
    assert_close_to_reference(lse, ref_lse[:, -1], plain_lse[:, -1], what="lse")
    assert_close_to_reference(last, ref[:, -1], plain[:, -1], what="state out")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_state_dtypes(device, dtype):
    scores, values, _ = random_problem(2, 4, 3, 8, dtype=dtype, device=device)
    _, (lse, out) = aaren.scan(scores, values)
    assert lse.dtype == torch.float64 and out.dtype == torch.float64  # docs/design.md, "The state"
    assert lse.shape == (2, 3) and out.shape == (2, 3, 8)


def test_hillis_steele_baseline_matches_reference(device):
    scores, values, _ = random_problem(2, 37, 3, 8, device=device)
    scores[:, :5] = float("-inf")
    torch.testing.assert_close(hillis_steele_scan(scores, values), reference_scan(scores, values)[0])


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_forward_every_branch_within_plain_pytorch_error(device, dtype, with_state):
    scores, values, state = mixed_problem(2, 48, 16, dtype, device, with_state)
    out, lse = op_outputs(scores, values, *(state or ()))
    ref, ref_lse = reference_scan(scores, values, state)
    plain, plain_lse = naive_scan(scores, values, state, dtype=dtype)
    assert_close_to_reference(out, ref, plain, what="out")
    assert_close_to_reference(lse, ref_lse, plain_lse, what="lse")


# ---------------------------------------------------------------- layouts

def test_strided_inputs_are_read_in_place(device):
    B, N, H, D = 2, 9, 3, 8
    # What Linear projections of a [N, B, E] (batch_first=False) input give, viewed as [B, N, H, D].
    projected = torch.randn(N, B, H * D + 5, dtype=torch.float64, device=device)
    values = projected[..., :H * D].view(N, B, H, D).transpose(0, 1)
    scores = torch.randn(N, H, B, dtype=torch.float64, device=device).permute(2, 0, 1)
    lse0 = torch.randn(H, B, dtype=torch.float64, device=device).t()
    out0 = torch.randn(B, 2 * H, D, dtype=torch.float64, device=device)[:, ::2]
    assert not values.is_contiguous() and not scores.is_contiguous() and not out0.is_contiguous()
    out, (lse, _) = aaren.scan(scores, values, (lse0, out0))
    ref_out, ref_lse = reference_scan(scores, values, (lse0, out0))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse[:, -1])
    inputs = requiring_grad(scores, values, lse0, out0)
    assert torch.autograd.gradcheck(scan_outputs, (scores.requires_grad_(), values.requires_grad_(),
                                                    lse0.requires_grad_(), out0.requires_grad_()))
    del inputs


def test_sliced_inputs(device):
    scores, values, _ = random_problem(4, 20, 6, 10, device=device)
    s, v = scores[1:3, 5:15:2, ::2], values[1:3, 5:15:2, ::2, 3:7]
    torch.testing.assert_close(aaren.scan(s, v)[0], reference_scan(s, v)[0])


def test_d_equal_one_with_any_stride(device):
    values = torch.randn(2, 5, 3, 4, dtype=torch.float64, device=device)[..., 1:2]  # stride(-1) = 1
    values_t = torch.randn(2, 5, 1, 3, dtype=torch.float64, device=device).transpose(2, 3)  # D=1, stride 3
    scores = torch.randn(2, 5, 3, dtype=torch.float64, device=device)
    for v in (values, values_t):
        torch.testing.assert_close(aaren.scan(scores, v)[0], reference_scan(scores, v)[0])


# ---------------------------------------------------------------- long sequences

def test_large_sequence_is_a_streaming_pass(device):
    """A long sequence with a single (batch, head): no quadratic memory, exact continuation."""
    N = 200_000
    scores, values, _ = random_problem(1, N, 1, 4, dtype=torch.float32, device=device, scale=2.0)
    out, (lse, _) = aaren.scan(scores, values)
    expected_lse = torch.logsumexp(scores.double()[0, :, 0], 0)
    assert abs(lse.item() - expected_lse.item()) < 1e-3
    weights = torch.softmax(scores.double()[0, :, 0], 0)
    expected_last = weights @ values.double()[0, :, 0]
    torch.testing.assert_close(out[0, -1, 0].double(), expected_last, rtol=1e-4, atol=1e-4)
    assert math.isfinite(out.abs().max().item())
