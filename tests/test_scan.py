"""aaren.scan / aaren.step against an independent float64 reference, on every device present.

Every low-precision result is held to tolerance.py's rule: within a small multiple of plain
PyTorch's own error in the same dtype (naive.py run in that dtype). float64 is checked with
gradcheck and against the reference directly.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aaren
from aaren.reference import hillis_steele_scan
from naive import naive_scan, reference_scan
from tolerance import assert_close_to_reference

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float64] + LOW_PRECISION


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def state_dtypes(dtype):
    """The dtypes of (lse, out) in the state aaren makes for `dtype` values."""
    lse, out = aaren.empty_state(1, 1, 1, dtype)
    return lse.dtype, out.dtype


def random_problem(B, N, H, D, dtype=torch.float64, device="cpu", with_state=False, scale=1.0):
    scores = (scale * torch.randn(B, N, H, dtype=torch.float64)).to(dtype).to(device)
    values = torch.randn(B, N, H, D, dtype=torch.float64).to(dtype).to(device)
    state = None
    if with_state:
        lse_dtype, out_dtype = state_dtypes(dtype)
        state = (torch.randn(B, H, dtype=torch.float64).to(lse_dtype).to(device),
                 torch.randn(B, H, D, dtype=torch.float64).to(out_dtype).to(device))
    return scores, values, state


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


# Scores that take every branch of the kernels, one kind per head:
#   0 unit:    N(0, 1): the usual case, a new maximum now and then
#   1 wide:    N(0, 30^2): large jumps both ways
#   2 ramp:    rising from -100 to +100 (+ noise): going backwards, the lse falls by more
#              than 32 every few tokens, so the backward lowers its reference (and rescales
#              its sums: lower_reference in combine.h) again and again
#   3 levels:  -100, then 0, then +100 (+ noise), a third of the tokens each: two falls of 100
#   4 falling: from +100 to -100: the first token stays the maximum (no rescale forward)
#   5 masked:  N(0, 1) with a third of the tokens -inf
# and across the batch: batch 0 has its first 3 tokens masked in every head (a masked prefix:
# lse -inf, output 0, zero gradients), the last batch has head 5 masked throughout.
KINDS = ["unit", "wide", "ramp", "levels", "falling", "masked"]


def mixed_scores(B, N, H=len(KINDS)):
    t = torch.linspace(0, 1, N, dtype=torch.float64)[None, :]
    noise = torch.randn(B, N, H, dtype=torch.float64)
    thirds = torch.div(torch.arange(N) * 3, max(N, 1), rounding_mode="floor").to(torch.float64)
    kinds = {
        "unit": noise[..., 0],
        "wide": 30 * noise[..., 1],
        "ramp": -100 + 200 * t + noise[..., 2],
        "levels": -100 + 100 * thirds[None, :] + noise[..., 3],
        "falling": 100 - 200 * t + noise[..., 4],
        "masked": noise[..., 5].masked_fill(torch.rand(B, N) < 1 / 3, float("-inf")),
    }
    scores = torch.stack([kinds[KINDS[h % len(KINDS)]] for h in range(H)], dim=2)
    scores[0, :3] = float("-inf")
    if B > 1 and H > 5:
        scores[-1, :, 5] = float("-inf")
    return scores


def backward_rescales(lse):
    """How often the CPU backward lowers its reference (lower_reference, combine.h) on these
    per-token lse [B, N, H]: it starts from the last token's lse and lowers the reference to
    lse_n whenever reference - lse_n > 32, skipping masked prefixes (lse -inf)."""
    count = 0
    for seq in lse.double().permute(0, 2, 1).reshape(-1, lse.size(1)):
        reference = seq[-1].item() if seq.numel() else 0.0
        for value in reversed(seq.tolist()):
            if value != -math.inf and reference - value > 32:
                reference, count = value, count + 1
    return count


def mixed_problem(B, N, D, dtype, device, with_state, H=len(KINDS)):
    scores = mixed_scores(B, N, H)
    values = torch.randn(B, N, H, D, dtype=torch.float64)
    state = None
    if with_state:
        lse_dtype, out_dtype = state_dtypes(dtype)
        state = ((5 * torch.randn(B, H, dtype=torch.float64)).to(lse_dtype).to(device),
                 torch.randn(B, H, D, dtype=torch.float64).to(out_dtype).to(device))
    return scores.to(dtype).to(device), values.to(dtype).to(device), state


def op_outputs(scores, values, lse0=None, out0=None):
    """aaren's per-token (out, lse), through the operator and its C++ autograd."""
    results = torch.ops.aaren.scan_forward(scores, values, lse0, out0)
    return results[0], results[1]


def naive_outputs(dtype):
    def outputs(scores, values, lse0=None, out0=None):
        return naive_scan(scores, values, None if lse0 is None else (lse0, out0), dtype=dtype)
    return outputs


GRAD_MODES = {"out and lse": (True, True), "out only": (True, False), "lse only": (False, True)}


def gradients(fn, inputs, grad_out, grad_lse, cast=lambda t: t):
    """d/d(inputs) of sum(out * grad_out) + sum(lse * grad_lse), per-token lse included; a
    gradient given as None is absent (the backward gets no tensor for that output)."""
    leaves = [cast(t).detach().requires_grad_() for t in inputs]
    out, lse = fn(*leaves)
    outputs, seeds = [], []
    if grad_out is not None:
        outputs.append(out)
        seeds.append(grad_out.to(out.dtype))
    if grad_lse is not None:
        outputs.append(lse)
        seeds.append(grad_lse.to(lse.dtype))
    grads = torch.autograd.grad(outputs, leaves, seeds, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]


def seeds(values, mode, dtype):
    """Random output gradients, exactly representable in `dtype` (so that every side of the
    comparison differentiates the same loss)."""
    wants_out, wants_lse = GRAD_MODES[mode]
    B, N, H, D = values.shape
    grad_out = torch.randn(B, N, H, D, dtype=torch.float64).to(dtype).double().to(values.device)
    grad_lse = torch.randn(B, N, H, dtype=torch.float64).to(dtype).double().to(values.device)
    return grad_out if wants_out else None, grad_lse if wants_lse else None


NAMES = ["scores", "values", "state lse", "state out"]


def check_gradients(scores, values, state, grad_out, grad_lse):
    """aaren's gradients against autograd through the float64 reference, within the rule
    (plain PyTorch's gradients in the same dtype set the tolerance)."""
    dtype = values.dtype
    inputs = (scores, values, *(state or ()))
    ours = gradients(op_outputs, inputs, grad_out, grad_lse)
    exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse, lambda t: t.double())
    plain = gradients(naive_outputs(dtype), inputs, grad_out, grad_lse, lambda t: t.to(dtype))
    for name, got, want, baseline in zip(NAMES, ours, exact, plain):
        assert_close_to_reference(got, want, baseline, what=f"d/d {name}")


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_backward_every_branch_within_plain_pytorch_error(device, dtype, with_state, mode):
    """Scores from -100 to +100, falls of the lse by more than 32 (the backward's rescale),
    masked tokens and prefixes, a state, and each output's gradient alone."""
    scores, values, state = mixed_problem(2, 48, 16, dtype, device, with_state)
    _, ref_lse = reference_scan(scores, values, state)
    assert backward_rescales(ref_lse) >= 8  # 10 to 17 here: mostly the ramp and levels heads
    check_gradients(scores, values, state, *seeds(values, mode, dtype))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_score_gradients_where_one_token_dominates(device, dtype, with_state):
    """Scores falling along the sequence (the first token dominates every output after it:
    out_j ~ v_i) and widely spread ones (a few tokens dominate in turn). There
    d/d s_i = sum_j e^(s_i - L_j) (g_j . (v_i - out_j) + G_j) is a sum of small terms; formed as
    v_i . S - P from two running sums that grow as sqrt(N), it had 4.6-5x plain PyTorch's error
    in float32 (csrc/ops/cpu/scan_kernel.cpp, "Backward"). Four seeds. Judged: d/d scores and
    d/d values (the state's gradients are the other tests'; here the state's lse gradient is
    held to the forward's float32 sums in L, docs/design.md, "Backward")."""
    B, N, H, D = 2, 300, 4, 32
    t = torch.linspace(0, 1, N, dtype=torch.float64)[None, :, None]
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(B, N, H, dtype=torch.float64, generator=generator)
        falling = 100 - 200 * t + noise
        scores = torch.cat([falling[..., :2], 30 * noise[..., 2:]], dim=2).to(dtype).to(device)
        values = torch.randn(B, N, H, D, dtype=torch.float64, generator=generator).to(dtype).to(device)
        state = ()
        if with_state:
            lse_dtype, out_dtype = state_dtypes(dtype)
            state = ((5 * torch.randn(B, H, dtype=torch.float64, generator=generator)).to(lse_dtype).to(device),
                     torch.randn(B, H, D, dtype=torch.float64, generator=generator).to(out_dtype).to(device))
        grad_out, grad_lse = seeds(values, "out and lse", dtype)
        inputs = (scores, values, *state)
        ours = gradients(op_outputs, inputs, grad_out, grad_lse)
        exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse, lambda t: t.double())
        plain = gradients(naive_outputs(dtype), inputs, grad_out, grad_lse, lambda t: t.to(dtype))
        for name, got, want, baseline in list(zip(NAMES, ours, exact, plain))[:2]:
            assert_close_to_reference(got, want, baseline, what=f"d/d {name}, seed {seed}")


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_id)
def test_forward_every_branch_within_plain_pytorch_error(device, dtype, with_state):
    scores, values, state = mixed_problem(2, 48, 16, dtype, device, with_state)
    out, lse = op_outputs(scores, values, *(state or ()))
    ref, ref_lse = reference_scan(scores, values, state)
    plain, plain_lse = naive_scan(scores, values, state, dtype=dtype)
    assert_close_to_reference(out, ref, plain, what="out")
    assert_close_to_reference(lse, ref_lse, plain_lse, what="lse")


def finite_outputs(scores, values, lse0=None, out0=None):
    """The operator's outputs with lse -inf (masked prefixes) read as 0, for finite differences."""
    out, lse = op_outputs(scores, values, lse0, out0)
    return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


@pytest.mark.parametrize("with_state", [False, True])
def test_gradcheck_every_branch(device, with_state):
    """float64, by finite differences: the same kinds of scores on 9 tokens (the ramp rises by
    25 per token and the levels by 100 every 3, so the backward rescales several times)."""
    scores, values, state = mixed_problem(2, 9, 2, torch.float64, device, with_state)
    assert backward_rescales(reference_scan(scores, values, state)[1]) >= 4
    inputs = requiring_grad(scores, values, *(state or ()))
    assert torch.autograd.gradcheck(finite_outputs, inputs)


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("with_state", [False, True])
def test_backward_every_branch_float64(device, with_state, mode):
    """float64 on the larger problem: against autograd through the reference, to a fixed
    1e-10 of the gradients' magnitude (the reference has no coarser baseline in float64)."""
    scores, values, state = mixed_problem(2, 48, 16, torch.float64, device, with_state)
    grad_out, grad_lse = seeds(values, mode, torch.float64)
    inputs = (scores, values, *(state or ()))
    ours = gradients(op_outputs, inputs, grad_out, grad_lse)
    exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse)
    for name, got, want in zip(NAMES, ours, exact):
        scale = max(want.abs().max().item(), 1e-300)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * scale, msg=f"d/d {name}")


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
        ("state lse must be a floating dtype", (s, v, (l0.long(), o0))),
        ("state out must be a floating dtype", (s, v, (l0, o0.int()))),
        ("state lse's batch dimension has 1 where values has 2", (s, v, (l0[:1], o0))),
        ("state out's last dimension has 3 where values has 4", (s, v, (l0, o0[..., :3]))),
        ("state out's head dimension has 2 where values has 3", (s, v, (l0, o0[:, :2]))),
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
    with pytest.raises(RuntimeError, match="aaren.step: score's head dimension has 2 where value has 3"):
        aaren.step(s[:, 0, :2], v[:, 0])
    with pytest.raises(RuntimeError, match="aaren.step: score's batch dimension has 1 where value has 2"):
        aaren.step(s[:1, 0], v[:, 0])
    with pytest.raises(TypeError, match="aaren.step: score and value must have the same dtype"):
        aaren.step(s[:, 0].double(), v[:, 0].float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mismatched_devices():
    s, v, (l0, o0) = random_problem(2, 5, 3, 4, device="cuda", with_state=True)
    with pytest.raises(RuntimeError, match="scores must be on the same device as values"):
        aaren.scan(s.cpu(), v)
    with pytest.raises(RuntimeError, match="state out must be on the same device as values"):
        aaren.scan(s, v, (l0, o0.cpu()))


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
def test_bfloat16_outputs_are_the_float32_kernels_rounded(shape):
    """The CPU kernels accumulate bfloat16 in float32 exactly as they run float32 itself, so
    each bfloat16 output is the float32 kernel's on the same (widened) inputs, rounded to
    nearest even as PyTorch rounds: bit for bit, whichever conversion the selected
    instruction set stores with (AVX512_BF16 has its own instruction, which flushes
    subnormals; values in that range are here, as are values that round up to infinity,
    infinities and NaN)."""
    B, N, H, D = shape
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(B, N, H, generator=generator).bfloat16()
    values = torch.randn(B, N, H, D, generator=generator)
    values[..., 0] = 3e-39       # a bfloat16 subnormal
    values[..., 1] = -1.5e-38    # near the smallest normal
    values[..., 2] = 3.39e38     # near the largest: a mean of them may round to inf
    values[0, 1, 0, 3] = float("inf")
    values[0, 2, 0, 4] = float("nan")
    values = values.bfloat16()
    out, lse, final_out = torch.ops.aaren.scan_forward(scores, values, None, None)
    wide = torch.ops.aaren.scan_forward(scores.float(), values.float(), None, None)
    torch.testing.assert_close(out, wide[0].bfloat16(), rtol=0, atol=0, equal_nan=True)
    for got, want in zip((lse, final_out), wide[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert (out[..., 0] != 0).all()  # subnormals kept, not flushed
    assert out[..., 2].isinf().any() and out.isnan().any()
