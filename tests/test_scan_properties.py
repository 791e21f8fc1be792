"""Property-based (hypothesis) tests of aaren.scan, on every device present: over random
shapes (empty sequences included), score scales, masking rates, states and split points, the
float64 forward matches the reference and continues exactly from a split, and the float64
gradients (per-token lse included) match autograd through the reference.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aaren
from naive import reference_scan
from scan_problems import GRAD_MODES, NAMES, gradients, naive_outputs, op_outputs, random_problem, seeds


# ---------------------------------------------------------------- property-based

# The device fixture is the same for every example: hypothesis may share it.
SHARED_FIXTURE = [HealthCheck.function_scoped_fixture]


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(
    B=st.integers(1, 3), N=st.integers(0, 40), H=st.integers(1, 3), D=st.integers(1, 40),
    scale=st.sampled_from([0.1, 1.0, 30.0, 1e3]), masked=st.floats(0.0, 0.9),
    with_state=st.booleans(), split=st.integers(0, 40),
)
def test_property_scan_matches_reference(device, B, N, H, D, scale, masked, with_state, split):
    scores, values, state = random_problem(B, N, H, D, device=device, with_state=with_state, scale=scale)
    scores = scores.masked_fill(torch.rand(scores.shape, dtype=torch.float64).to(device) < masked,
                                float("-inf"))
    out, (lse, last) = aaren.scan(scores, values, state)
    ref_out, ref_lse = reference_scan(scores, values, state)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    if N > 0:
        torch.testing.assert_close(lse, ref_lse[:, -1], rtol=1e-10, atol=1e-10)
    split = min(split, N)
    first, mid_state = aaren.scan(scores[:, :split], values[:, :split], state)
    second, _ = aaren.scan(scores[:, split:], values[:, split:], mid_state)
    torch.testing.assert_close(torch.cat([first, second], 1), out, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None, suppress_health_check=SHARED_FIXTURE)
@given(N=st.integers(1, 12), D=st.integers(1, 9), masked=st.floats(0.0, 0.8), with_state=st.booleans(),
       scale=st.sampled_from([1.0, 3.0, 30.0, 100.0]), mode=st.sampled_from(list(GRAD_MODES)))
def test_property_gradients_match_reference(device, N, D, masked, with_state, scale, mode):
    """float64 gradients, per-token lse included, against autograd through the reference;
    scales of 30 and 100 make the backward rescale (lse falls of more than 32)."""
    scores, values, state = random_problem(2, N, 2, D, device=device, with_state=with_state, scale=scale)
    scores = scores.masked_fill(torch.rand(scores.shape, dtype=torch.float64).to(device) < masked,
                                float("-inf"))
    inputs = (scores, values, *(state or ()))
    grad_out, grad_lse = seeds(values, mode, torch.float64)
    ours = gradients(op_outputs, inputs, grad_out, grad_lse)
    exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse)
    for name, got, want in zip(NAMES, ours, exact):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)
