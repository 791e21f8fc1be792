"""The one tolerance rule of the test suite: aaren's error against the float64 reference
may not exceed a small multiple of plain PyTorch's error in the same dtype.

    max |got - ref64| <= FACTOR * max |baseline - ref64| + eps(dtype) * max |ref64|

`ref64` is the float64 reference (naive.py: a masked softmax over every prefix, or autograd
through it), `baseline` the same naive formula run by plain PyTorch in `got`'s dtype: what a
user gets without aaren. The tolerance therefore follows the dtype and the problem (the
length, the score range, the conditioning of the gradient) by itself, with no number to
tune per test.
"""
import torch

# Why 3: aaren and plain PyTorch round in different orders (a streaming sum against a
# pairwise one, a float32 accumulator against the dtype's own), so even two equally good
# implementations differ in their largest error over thousands of elements by a factor of
# about 1.5-2; FlashAttention's tests allow 2x against the same kind of baseline (its
# forward and backward against plain PyTorch in the same dtype), and 3 leaves room for the
# streaming order without letting through a real loss of accuracy: the bugs this suite is
# meant to catch (a wrong rescale, a lost bit of lse, a wrong branch) are off by 10x to
# 1e30x the baseline. In the half types aaren accumulates in float32 and rounds once,
# so there its error is usually far below the baseline's.
FACTOR = 3.0

EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float16: torch.finfo(torch.float16).eps,
}


def error_against(got, ref64):
    """(max |got - ref64| over the finite entries of ref64, max |ref64| there).

    Entries where ref64 is infinite (the lse of a prefix with every token masked) must be
    equal exactly; NaN is never right."""
    got = got.detach().double()
    ref64 = ref64.detach().double()
    assert got.shape == ref64.shape, (tuple(got.shape), tuple(ref64.shape))
    assert not torch.isnan(ref64).any(), "the reference has NaN"
    finite = torch.isfinite(ref64)
    assert torch.equal(got[~finite], ref64[~finite]), "infinite entries differ"
    assert torch.isfinite(got[finite]).all(), "non-finite values where the reference is finite"
    if not finite.any():
        return 0.0, 0.0
    return ((got - ref64)[finite].abs().max().item(), ref64[finite].abs().max().item())


def tolerance_for(baseline, ref64, factor=FACTOR):
    """The largest error the rule allows, for a problem in `baseline`'s dtype."""
    baseline_error, magnitude = error_against(baseline, ref64)
    # The floor: one unit in the last place of the largest reference value. Storing the
    # exact answer in the dtype already costs half of that, so no implementation can do
    # better; it matters only where plain PyTorch happens to be exact (one token, say).
    return factor * baseline_error + EPS[baseline.dtype] * magnitude


def assert_close_to_reference(got, ref64, baseline, *, factor=FACTOR, what=""):
    """aaren's `got` is within `factor` times plain PyTorch's error (`baseline`, computed in
    the inputs' dtype) of the float64 reference `ref64`, plus one ulp of its magnitude.

    `got` is compared through .double(), whatever its dtype (an lse accumulated in a wider
    type than the inputs is held to the same rule). float64 problems have no coarser
    plain-PyTorch computation to compare with (the baseline would be the reference itself):
    those are checked with gradcheck and fixed tolerances instead."""
    assert baseline.dtype != torch.float64, "float64: use gradcheck / a fixed tolerance"
    error, _ = error_against(got, ref64)
    baseline_error, _ = error_against(baseline, ref64)
    allowed = tolerance_for(baseline, ref64, factor)
    assert error <= allowed, (
        f"{what}: aaren's error {error:.3e} exceeds {allowed:.3e} "
        f"({factor:g} x plain PyTorch's {baseline_error:.3e} in {baseline.dtype} + 1 ulp)")
