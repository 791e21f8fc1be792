"""aaren.scan / aaren.step against an independent float64 reference, on every device present."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aaren
from aaren.reference import hillis_steele_scan
from naive import reference_scan, reference_scan_in_dtype

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float64] + LOW_PRECISION


def random_problem(B, N, H, D, dtype=torch.float64, device="cpu", with_state=False, scale=1.0):
    scores = (scale * torch.randn(B, N, H, dtype=torch.float64)).to(dtype).to(device)
    values = torch.randn(B, N, H, D, dtype=torch.float64).to(dtype).to(device)
    state = None
    if with_state:
        lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = (torch.randn(B, H, dtype=lse_dtype, device=device),
                 torch.randn(B, H, D, dtype=torch.float64).to(dtype).to(device))
    return scores, values, state


def assert_close_to_reference(out, ref, plain, *, slack=2.0, atol=1e-6):
    """aaren's error against float64 stays within `slack` times plain PyTorch's in the same dtype."""
    aaren_error = (out.double() - ref).abs().max().item()
    plain_error = (plain.double() - ref).abs().max().item()
    assert aaren_error <= slack * plain_error + atol, (aaren_error, plain_error)


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


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_forward_low_precision_within_plain_pytorch_error(device, dtype):
    scores, values, _ = random_problem(2, 300, 4, 64, dtype=dtype, device=device, scale=3.0)
    out, (lse, _) = aaren.scan(scores, values)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, ref_lse = reference_scan(scores, values)
    assert_close_to_reference(out, ref, reference_scan_in_dtype(scores, values))
    # lse is accumulated in float32 whatever the input dtype.
    torch.testing.assert_close(lse.double(), ref_lse[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_state_dtypes(device, dtype):
    scores, values, _ = random_problem(2, 4, 3, 8, dtype=dtype, device=device)
    _, (lse, out) = aaren.scan(scores, values)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.dtype == dtype and lse.shape == (2, 3) and out.shape == (2, 3, 8)


def test_hillis_steele_baseline_matches_reference(device):
    scores, values, _ = random_problem(2, 37, 3, 8, device=device)
    scores[:, :5] = float("-inf")
    torch.testing.assert_close(hillis_steele_scan(scores, values), reference_scan(scores, values)[0])


# ---------------------------------------------------------------- gradients

def scan_outputs(scores, values, lse0=None, out0=None):
    state = None if lse0 is None else (lse0, out0)
    out, (lse, _) = aaren.scan(scores, values, state)
    return out, lse


def step_outputs(score, value, lse0=None, out0=None):
    state = None if lse0 is None else (lse0, out0)
    out, (lse, _) = aaren.step(score, value, state)
    return out, lse


def requiring_grad(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


@pytest.mark.parametrize("with_state", [False, True])
def test_gradcheck_scan(device, with_state):
    scores, values, state = random_problem(2, 6, 3, 4, device=device, with_state=with_state)
    inputs = requiring_grad(scores, values, *(state or ()))
    assert torch.autograd.gradcheck(scan_outputs, inputs)


def test_gradcheck_scan_with_masked_tokens(device):
    scores, values, state = random_problem(2, 6, 2, 3, device=device, with_state=True)
    scores[:, 1] = float("-inf")
    scores[0, 4, 1] = float("-inf")
    assert torch.autograd.gradcheck(scan_outputs, requiring_grad(scores, values, *state))


def test_gradcheck_step(device):
    scores, values, state = random_problem(3, 1, 2, 5, device=device, with_state=True)
    inputs = requiring_grad(scores[:, 0], values[:, 0], *state)
    assert torch.autograd.gradcheck(step_outputs, inputs)
    assert torch.autograd.gradcheck(step_outputs, inputs[:2])


def reference_outputs(scores, values, lse0=None, out0=None):
    state = None if lse0 is None else (lse0, out0)
    out, lse = reference_scan(scores, values, state)
    return out, lse[:, -1]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_backward_low_precision(device, dtype):
    scores, values, state = random_problem(2, 64, 3, 32, dtype=dtype, device=device, with_state=True)
    grad_out = torch.randn(values.shape, dtype=torch.float64, device=device)
    grad_lse = torch.randn(2, 3, dtype=torch.float64, device=device)

    def grads(fn, inputs, cast):
        inputs = requiring_grad(*(cast(t) for t in inputs))
        out, lse = fn(*inputs)
        torch.autograd.backward([out, lse], [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
        return [t.grad.double() for t in inputs]

    ours = grads(scan_outputs, (scores, values, *state), lambda t: t)
    exact = grads(reference_outputs, (scores, values, *state), lambda t: t.double())
    for got, want in zip(ours, exact):
        scale = want.abs().max().item()
        tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
        assert (got - want).abs().max().item() <= tolerance * scale


def test_gradient_through_lse_only(device):
    """Only the final state's lse is used: grad_out is absent in the backward."""
    scores, values, _ = random_problem(2, 5, 3, 4, device=device)
    scores, values = requiring_grad(scores, values)
    _, (lse, _) = aaren.scan(scores, values)
    lse.sum().backward()
    torch.testing.assert_close(scores.grad, torch.softmax(scores.detach(), dim=1))
    torch.testing.assert_close(values.grad, torch.zeros_like(values))


def test_gradient_with_expanded_grad_out(device):
    """out.sum() hands the backward an expanded (stride 0) gradient."""
    scores, values, _ = random_problem(2, 5, 3, 4, device=device)
    ours = requiring_grad(scores, values)
    aaren.scan(*ours)[0].sum().backward()
    ref = requiring_grad(scores, values)
    reference_scan(*ref)[0].sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_scores_spanning_1e4(device, dtype):
    if dtype in (torch.float16,):
        pytest.skip("float16 cannot represent 1e4-scale scores to the resolution the test needs")
    scores, values, _ = random_problem(2, 50, 2, 8, dtype=torch.float64, device=device)
    scores = (scores.sign() * 1e4 + scores).to(dtype)
    out, (lse, _) = aaren.scan(scores, values.to(dtype))
    ref, ref_lse = reference_scan(scores, values.to(dtype))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lse.double(), ref_lse[:, -1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
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


# ---------------------------------------------------------------- state, chunks and steps

@pytest.mark.parametrize("dtype", ALL_DTYPES)
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


@pytest.mark.parametrize("dtype", ALL_DTYPES)
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


# ---------------------------------------------------------------- bad input

def bad_input_cases(device):
    s, v, (l0, o0) = random_problem(2, 5, 3, 4, dtype=torch.float32, device=device, with_state=True)
    return [
        ("scores must have shape \\[B, N, H\\]", (s[0], v, None)),
        ("values must have shape \\[B, N, H, D\\]", (s, v[0], None)),
        ("values must be float64, float32, bfloat16 or float16", (s.long(), v.long(), None)),
        ("scores and values must have the same dtype", (s.double(), v, None)),
        ("scores' batch dimension has 1 where values has 2", (s[:1], v, None)),
        ("scores' sequence dimension has 4 where values has 5", (s[:, :4], v, None)),
        ("scores' head dimension has 2 where values has 3", (s[:, :, :2], v, None)),
        ("values must be contiguous in its last dimension", (s, v.transpose(2, 3).contiguous().transpose(2, 3), None)),
        ("state lse must have shape \\[B, H\\]", (s, v, (l0[0], o0))),
        ("state out must have shape \\[B, H, D\\]", (s, v, (l0, o0[0]))),
        ("state lse must be Float for Float values", (s, v, (l0.double(), o0))),
        ("state out must have the dtype of values", (s, v, (l0, o0.half()))),
        ("state lse's batch dimension has 1 where values has 2", (s, v, (l0[:1], o0))),
        ("state out's last dimension has 3 where values has 4", (s, v, (l0, o0[..., :3]))),
        ("state out must be contiguous in its last dimension", (s, v, (l0, o0.transpose(1, 2).contiguous().transpose(1, 2)))),
    ]


@pytest.mark.parametrize("case", range(15))
def test_bad_input_raises_clear_error(device, case):
    message, (s, v, state) = bad_input_cases(device)[case]
    with pytest.raises((RuntimeError, TypeError), match=message):
        aaren.scan(s, v, state)


def test_state_needs_both_parts(device):
    s, v, (l0, o0) = random_problem(2, 5, 3, 4, device=device, with_state=True)
    with pytest.raises(RuntimeError, match="the state needs both lse and out"):
        torch.ops.aaren.scan_forward(s, v, l0, None)


def test_step_bad_input(device):
    s, v, _ = random_problem(2, 5, 3, 4, device=device)
    with pytest.raises(RuntimeError, match="aaren.step: score must have shape \\[B, H\\]"):
        aaren.step(s, v[:, 0])
    with pytest.raises(RuntimeError, match="aaren.step: value must have shape \\[B, H, D\\]"):
        aaren.step(s[:, 0], v)
    with pytest.raises(RuntimeError, match="aaren.step: scores' head dimension has 2 where values has 3"):
        aaren.step(s[:, 0, :2], v[:, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mismatched_devices():
    s, v, (l0, o0) = random_problem(2, 5, 3, 4, device="cuda", with_state=True)
    with pytest.raises(RuntimeError, match="scores must be on the same device as values"):
        aaren.scan(s.cpu(), v)
    with pytest.raises(RuntimeError, match="state out must be on the same device as values"):
        aaren.scan(s, v, (l0, o0.cpu()))


# ---------------------------------------------------------------- property-based

@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), N=st.integers(0, 40), H=st.integers(1, 3), D=st.integers(1, 40),
    scale=st.sampled_from([0.1, 1.0, 30.0, 1e3]), masked=st.floats(0.0, 0.9),
    with_state=st.booleans(), split=st.integers(0, 40),
)
def test_property_scan_matches_reference(B, N, H, D, scale, masked, with_state, split):
    scores, values, state = random_problem(B, N, H, D, with_state=with_state, scale=scale)
    scores = scores.masked_fill(torch.rand(scores.shape, dtype=torch.float64) < masked, float("-inf"))
    out, (lse, last) = aaren.scan(scores, values, state)
    ref_out, ref_lse = reference_scan(scores, values, state)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    if N > 0:
        torch.testing.assert_close(lse, ref_lse[:, -1], rtol=1e-10, atol=1e-10)
    split = min(split, N)
    first, mid_state = aaren.scan(scores[:, :split], values[:, :split], state)
    second, _ = aaren.scan(scores[:, split:], values[:, split:], mid_state)
    torch.testing.assert_close(torch.cat([first, second], 1), out, rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 12), D=st.integers(1, 9), masked=st.floats(0.0, 0.8), with_state=st.booleans())
def test_property_gradients_match_reference(N, D, masked, with_state):
    scores, values, state = random_problem(2, N, 2, D, with_state=with_state, scale=3.0)
    scores = scores.masked_fill(torch.rand(scores.shape, dtype=torch.float64) < masked, float("-inf"))
    inputs = (scores, values, *(state or ()))
    grad_out = torch.randn(values.shape, dtype=torch.float64)
    grad_lse = torch.randn(2, 2, dtype=torch.float64)
    results = []
    for fn in (scan_outputs, reference_outputs):
        leaves = requiring_grad(*inputs)
        out, lse = fn(*leaves)
        finite = torch.isfinite(lse)  # d lse / d x is undefined where lse = -inf: leave it out
        (out * grad_out).sum().backward(retain_graph=True)
        (lse[finite] * grad_lse[finite]).sum().backward()
        results.append([leaf.grad for leaf in leaves])
    for ours, ref in zip(*results):
        assert torch.isfinite(ours).all()
        ref = torch.nan_to_num(ref, nan=0.0)  # the reference's own exp(-inf + inf) at masked entries
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_large_sequence_is_a_streaming_pass():
    """A long sequence with a single (batch, head): no quadratic memory, exact continuation."""
    N = 200_000
    scores, values, _ = random_problem(1, N, 1, 4, dtype=torch.float32, scale=2.0)
    out, (lse, _) = aaren.scan(scores, values)
    expected_lse = torch.logsumexp(scores.double()[0, :, 0], 0)
    assert abs(lse.item() - expected_lse.item()) < 1e-3
    weights = torch.softmax(scores.double()[0, :, 0], 0)
    expected_last = weights @ values.double()[0, :, 0]
    torch.testing.assert_close(out[0, -1, 0].double(), expected_last, rtol=1e-4, atol=1e-4)
    assert math.isfinite(out.abs().max().item())
