"""Problems and helpers shared by the tests of aaren.scan / aaren.step (test_scan_*.py) and of
the CPU kernels (test_cpu_*.py): the dtypes tested, random problems, the "mixed" problems
whose scores take every branch of the kernels (KINDS), the operator's and the naive
reference's per-token outputs, and their gradients checked against the float64 reference
under tolerance.py's rule. Not a test module: it holds no tests.
"""
import math

import torch

import aaren
from naive import naive_scan
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


def scan_outputs(scores, values, lse0=None, out0=None):
    state = None if lse0 is None else (lse0, out0)
    out, (lse, _) = aaren.scan(scores, values, state)
    return out, lse


def requiring_grad(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


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


def finite_outputs(scores, values, lse0=None, out0=None):
    """The operator's outputs with lse -inf (masked prefixes) read as 0, for finite differences."""
    out, lse = op_outputs(scores, values, lse0, out0)
    return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
