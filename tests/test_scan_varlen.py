"""aaren.scan_varlen, the packed variable-length scan, on every device present: each sequence
against aaren.scan over it alone (bitwise with the chunk count fixed) and against the float64
reference, with lengths of zero, one, one long sequence among short ones and many short ones,
with and without initial states; gradients (gradcheck and gradgradcheck in float64, and
against aaren.scan's per sequence); right-padding with -inf as a second oracle; every bad
cu_seqlens; opcheck, torch.compile, torch.export and TorchScript; and the CPU's split of the
work over threads (short sequences in parallel, long ones alone).
"""
import warnings

import pytest
import torch

import aaren
from naive import naive_scan, reference_scan
from scan_problems import ALL_DTYPES, LOW_PRECISION, dtype_id, state_dtypes
from tolerance import assert_close_to_reference

LENGTHS = {
    "zeros and ones": [0, 1, 0, 0, 1, 1, 0],
    "one long among short": [3, 1, 700, 2, 0, 5],
    "many short": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 11, 12] * 3,
    "single": [37],
    "all empty": [0, 0, 0],
    "long first and last": [300, 1, 0, 2, 257],
}


def bounds(lengths, dtype=torch.int32, device="cpu"):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(dtype).to(device)


def packed_problem(lengths, H=3, D=5, dtype=torch.float64, device="cpu", with_state=False,
                   scale=2.0):
    T = sum(lengths)
    scores = (scale * torch.randn(T, H, dtype=torch.float64)).to(dtype).to(device)
    values = torch.randn(T, H, D, dtype=torch.float64).to(dtype).to(device)
    state = None
    if with_state:
        lse_dtype, out_dtype = state_dtypes(dtype)
        N = len(lengths)
        state = ((3 * torch.randn(N, H, dtype=torch.float64)).to(lse_dtype).to(device),
                 torch.randn(N, H, D, dtype=torch.float64).to(out_dtype).to(device))
    return scores, values, state


def per_sequence(fn, scores, values, lengths, state):
    """fn(scores [1, n, H], values [1, n, H, D], state or None) per sequence -> lists."""
    results = []
    start = 0
    for i, n in enumerate(lengths):
        s = scores[start:start + n].unsqueeze(0)
        v = values[start:start + n].unsqueeze(0)
        st = None if state is None else (state[0][i:i + 1], state[1][i:i + 1])
        results.append(fn(s, v, st))
        start += n
    return results


def scan_each(scores, values, lengths, state=None):
    """aaren.scan over each sequence alone: (out [T, H, D], (lse [N, H], out [N, H, D]))."""
    results = per_sequence(aaren.scan, scores, values, lengths, state)
    H, D = values.shape[1:]
    out = torch.cat([o[0] for o, _ in results]) if results else values.new_zeros(0, H, D)
    lse = torch.cat([st[0] for _, st in results])
    final = torch.cat([st[1] for _, st in results])
    return out, (lse, final)


@pytest.fixture
def unsplit(monkeypatch):
    """One chunk per sequence on any thread count, in aaren.scan and in scan_varlen alike: the
    bits then do not depend on how the work was split (docs/design.md)."""
    monkeypatch.setenv("AAREN_CPU_SEQUENCE_CHUNKS", "1")


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_equals_scan_of_each_sequence(device, dtype, case, with_state, unsplit):
    lengths = LENGTHS[case]
    scores, values, state = packed_problem(lengths, dtype=dtype, device=device,
                                           with_state=with_state)
    cu = bounds(lengths, device=device)
    out, (lse, final) = aaren.scan_varlen(scores, values, cu, max(lengths), state)
    want_out, (want_lse, want_final) = scan_each(scores, values, lengths, state)
    assert out.dtype == dtype and lse.dtype == final.dtype == torch.float64
    assert out.shape == values.shape and lse.shape == (len(lengths), 3)
    assert final.shape == (len(lengths), 3, 5)
    if device.type == "cpu":  # the same kernels on the same views: the same bits
        assert torch.equal(out, want_out)
        assert torch.equal(lse, want_lse)
        assert torch.equal(final, want_final)
    else:
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(lse, want_lse)
        torch.testing.assert_close(final, want_final)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_against_float64_reference(device, dtype, with_state):
    lengths = LENGTHS["one long among short"] + [0, 1, 40]
    scores, values, state = packed_problem(lengths, dtype=dtype, device=device,
                                           with_state=with_state, scale=5.0)
    scores[4:9, 1] = float("-inf")  # a masked prefix of the long sequence, in one head
    out, (lse, final) = aaren.scan_varlen(scores, values, bounds(lengths, device=device),
                                          None, state)

    def reference(s, v, st, dtype=torch.float64):
        o, l = naive_scan(s, v, st, dtype=dtype)
        return o, l

    refs = per_sequence(reference, scores, values, lengths, state)
    ref_out = torch.cat([o[0] for o, _ in refs])
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    else:
        plain = per_sequence(lambda s, v, st: reference(s, v, st, dtype), scores, values,
                             lengths, state)
        assert_close_to_reference(out, ref_out, torch.cat([o[0] for o, _ in plain]), what="out")
    # The final state: the last token's lse and out, or the initial state for no tokens.
    for i, ((o, l), n) in enumerate(zip(refs, lengths)):
        if n > 0:
            torch.testing.assert_close(lse[i], l[0, -1].to(lse.device), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(final[i], o[0, -1].to(final.device),
                                       rtol=1e-2 if dtype in LOW_PRECISION[1:] else 1e-5,
                                       atol=1e-2 if dtype in LOW_PRECISION[1:] else 1e-5)
        elif state is not None:
            assert torch.equal(lse[i], state[0][i].double()) and torch.equal(final[i], state[1][i].double())
        else:
            assert torch.isneginf(lse[i]).all() and not final[i].any()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("case", ["zeros and ones", "one long among short", "all empty"])
def test_right_padding_with_minus_inf_is_a_second_oracle(device, case, with_state, unsplit):
    """Padding every sequence on the right to the longest with score -inf: a masked token
    leaves the state as it was, so the padded aaren.scan's valid outputs and final states are
    the packed scan's (to float32's rounding: a sequence of one token after a state is a step,
    computed in float64, and a state passed through masked tokens is rounded to the
    accumulation dtype)."""
    lengths = LENGTHS[case]
    scores, values, state = packed_problem(lengths, dtype=torch.float32, device=device,
                                           with_state=with_state)
    longest = max(lengths)
    N, H, D = len(lengths), values.size(1), values.size(2)
    padded_scores = torch.full((N, longest, H), float("-inf"), device=device)
    padded_values = torch.randn(N, longest, H, D, device=device)  # anything: masked
    valid = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    padded_scores[valid] = scores
    padded_values[valid] = values
    padded_out, (padded_lse, padded_final) = aaren.scan(padded_scores, padded_values, state)
    out, (lse, final) = aaren.scan_varlen(scores, values, bounds(lengths, device=device),
                                          longest, state)
    torch.testing.assert_close(out, padded_out[valid])
    torch.testing.assert_close(lse, padded_lse)
    torch.testing.assert_close(final, padded_final, rtol=1.3e-6, atol=1e-5)


def test_int64_bounds_and_no_max_seqlen(device, unsplit):
    lengths = LENGTHS["many short"]
    scores, values, _ = packed_problem(lengths, device=device)
    a = aaren.scan_varlen(scores, values, bounds(lengths, torch.int32, device))
    b = aaren.scan_varlen(scores, values, bounds(lengths, torch.int64, device), max(lengths))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])


def test_strided_inputs(device, unsplit):
    """Scores and values read through their strides (a fused projection's slices)."""
    lengths = [5, 0, 17, 1]
    T, H, D = sum(lengths), 4, 8
    fused = torch.randn(T, H + H * D, dtype=torch.float64, device=device)
    scores, values = fused[:, :H], fused[:, H:].view(T, H, D)
    assert not scores.is_contiguous() and not values.is_contiguous()
    got = aaren.scan_varlen(scores, values, bounds(lengths, device=device))
    want = aaren.scan_varlen(scores.contiguous(), values.contiguous(), bounds(lengths, device=device))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1][1], want[1][1])


def test_final_state_has_its_own_storage(device):
    scores, values, state = packed_problem([3, 0, 2], device=device, with_state=True)
    out, (lse, final) = aaren.scan_varlen(scores, values, bounds([3, 0, 2], device=device), 3, state)
    lse[1] += 1
    final[1] += 1
    assert not torch.equal(lse[1], state[0][1]) and not torch.equal(final[1], state[1][1])


def test_continues_from_final_states(device):
    """Two packed chunks of the same sequences, the second from the first's states: one scan."""
    first, second = [4, 0, 9, 2], [3, 5, 0, 1]
    whole = [a + b for a, b in zip(first, second)]
    scores, values, _ = packed_problem(whole, device=device)
    take_first = torch.cat([torch.arange(s, s + a) for s, a in zip(bounds(whole)[:-1].tolist(), first)])
    take_second = torch.cat([torch.arange(s + a, s + a + b)
                             for s, a, b in zip(bounds(whole)[:-1].tolist(), first, second)])
    out1, state = aaren.scan_varlen(scores[take_first], values[take_first], bounds(first, device=device))
    out2, final = aaren.scan_varlen(scores[take_second], values[take_second],
                                    bounds(second, device=device), None, state)
    out, want_final = aaren.scan_varlen(scores, values, bounds(whole, device=device))
    torch.testing.assert_close(out1, out[take_first])
    torch.testing.assert_close(out2, out[take_second])
    torch.testing.assert_close(final[0], want_final[0])
    torch.testing.assert_close(final[1], want_final[1])


# ---------------------------------------------------------------- gradients

def varlen_outputs(cu, max_seqlen):
    """The outputs, with the lse -inf of an empty sequence without a state read as 0 (finite
    differences of -inf are NaN)."""
    def outputs(scores, values, *state):
        out, (lse, final) = aaren.scan_varlen(scores, values, cu, max_seqlen, state or None)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse), final
    return outputs


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("lengths", [[2, 0, 1, 3], [0, 0], [4], [1, 1, 0, 2]], ids=str)
def test_gradcheck(device, lengths, with_state):
    scores, values, state = packed_problem(lengths, H=2, D=3, device=device, with_state=with_state)
    if lengths[0] >= 2:
        scores[0, 1] = float("-inf")  # a masked first token (the final lse stays finite)
    inputs = [t.detach().clone().requires_grad_() for t in (scores, values, *(state or ()))]
    fn = varlen_outputs(bounds(lengths, device=device), max(lengths))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_gradients_equal_scan_of_each_sequence(device, dtype, with_state, unsplit):
    lengths = LENGTHS["one long among short"] + [0, 1]
    scores, values, state = packed_problem(lengths, dtype=dtype, device=device, with_state=with_state)
    N = len(lengths)
    g_out = torch.randn_like(values)
    g_lse = torch.randn(N, 3, dtype=torch.float64, device=device)
    g_final = torch.randn(N, 3, 5, dtype=torch.float64, device=device)

    def loss(out, lse, final):
        return (out * g_out).sum() + (lse.nan_to_num(neginf=0) * g_lse).sum() + (final * g_final).sum()

    leaves = [t.detach().clone().requires_grad_() for t in (scores, values, *(state or ()))]
    packed = aaren.scan_varlen(leaves[0], leaves[1], bounds(lengths, device=device), None,
                               tuple(leaves[2:]) or None)
    got = torch.autograd.grad(loss(packed[0], *packed[1]), leaves)
    leaves2 = [t.detach().clone().requires_grad_() for t in (scores, values, *(state or ()))]
    each = scan_each(leaves2[0], leaves2[1], lengths, tuple(leaves2[2:]) or None)
    want = torch.autograd.grad(loss(each[0], *each[1]), leaves2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2, atol=1e-6)


def test_backward_of_some_outputs_only(device):
    """Gradients reaching out only, the final lse only or the final out only."""
    lengths = [3, 0, 2]
    scores, values, state = packed_problem(lengths, device=device, with_state=True)
    fn = varlen_outputs(bounds(lengths, device=device), None)
    for k in range(3):
        inputs = [t.detach().clone().requires_grad_() for t in (scores, values, *state)]
        assert torch.autograd.gradcheck(lambda *x: fn(*x)[k], inputs)


# ---------------------------------------------------------------- bad input

def bad_cu_seqlens_cases(device):
    T = 6
    ok = [0, 2, 2, 6]
    t = lambda values, dtype=torch.int32: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
    return [
        ("cu_seqlens must start at 0, got cu_seqlens\\[0\\] = 1", t([1, 2, 2, 6]), None),
        ("cu_seqlens must be non-decreasing .*cu_seqlens\\[2\\] = 1 after cu_seqlens\\[1\\] = 3",
         t([0, 3, 1, 6]), None),
        ("cu_seqlens must end at the number of tokens T = values.size\\(0\\) = 6, got cu_seqlens\\[3\\] = 5",
         t([0, 2, 2, 5]), None),
        ("cu_seqlens must end at the number of tokens .* got cu_seqlens\\[3\\] = 7", t([0, 2, 2, 7]), None),
        ("cu_seqlens must be int32 or int64, got Float", t(ok, torch.float32), None),
        ("cu_seqlens must be int32 or int64, got Short", t(ok, torch.int16), None),
        ("cu_seqlens must be a 1-D tensor", t(ok).view(2, 2), None),
        ("cu_seqlens must have N \\+ 1 >= 1 entries", t([]), None),
        ("max_seqlen is 3 but the longest sequence has 4 tokens", t(ok), 3),
        ("max_seqlen must be non-negative, got -1", t(ok), -1),
    ], T


@pytest.mark.parametrize("case", range(10))
def test_bad_cu_seqlens_raise_clear_errors(case):
    """On the CPU every check runs (docs/operators.md: what CUDA checks, and when)."""
    cases, T = bad_cu_seqlens_cases("cpu")
    message, cu, max_seqlen = cases[case]
    scores, values = torch.randn(T, 2), torch.randn(T, 2, 3)
    with pytest.raises((RuntimeError, TypeError), match=message):
        aaren.scan_varlen(scores, values, cu, max_seqlen)


def test_cu_seqlens_as_a_list_gets_a_type_error():
    scores, values = torch.randn(6, 2), torch.randn(6, 2, 3)
    with pytest.raises(TypeError, match="cu_seqlens must be a tensor .* got list"):
        aaren.scan_varlen(scores, values, [0, 2, 6])


def test_bad_cu_seqlens_raise_in_backward_too():
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    scores, values = torch.randn(6, 2), torch.randn(6, 2, 3)
    out, lse, _, _ = torch.ops.aaren.scan_varlen_forward(scores, values, cu)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        torch.ops.aaren.scan_varlen_backward(torch.randn_like(out), None, scores, values,
                                             torch.tensor([0, 4, 2, 6]), None, out, lse)


def test_bad_tensors_raise_clear_errors(device):
    scores, values, state = packed_problem([2, 3], device=device, with_state=True)
    cu = bounds([2, 3], device=device)
    cases = [
        ("scores must have shape \\[T, H\\]", (scores[None], values, cu, None, None)),
        ("values must have shape \\[T, H, D\\]", (scores, values[None], cu, None, None)),
        ("scores' token dimension has 4 where values has 5", (scores[:4], values, cu, None, None)),
        ("scores and values must have the same dtype", (scores.float(), values, cu, None, None)),
        ("values must be contiguous in its last dimension",
         (scores, values.transpose(1, 2).contiguous().transpose(1, 2), cu, None, None)),
        ("state lse's batch dimension has 1 where cu_seqlens' sequence count has 2",
         (scores, values, cu, None, (state[0][:1], state[1]))),
        ("state out's last dimension has 4 where values has 5",
         (scores, values, cu, None, (state[0], state[1][..., :4]))),
    ]
    for message, args in cases:
        with pytest.raises((RuntimeError, TypeError), match=message):
            aaren.scan_varlen(*args)
    with pytest.raises(TypeError, match="state must be a pair"):
        aaren.scan_varlen(scores, values, cu, None, state[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cu_seqlens_on_another_device():
    scores, values, _ = packed_problem([2, 3], device="cuda")
    with pytest.raises(RuntimeError, match="cu_seqlens must be on the same device as values"):
        aaren.scan_varlen(scores, values, bounds([2, 3]))


# ---------------------------------------------------------------- the CPU's split of the work

SPLITS = {
    "many short": LENGTHS["many short"] * 8,
    "one long among short": [3000] + LENGTHS["many short"] * 2,
    "two long after short": [10, 0, 1] * 3 + [1500, 1500],
}


@pytest.mark.parametrize("case", list(SPLITS))
def test_thread_count_does_not_change_the_bits(case, unsplit):
    """Short sequences in parallel runs (one per thread) and long ones alone (longer than a
    thread's share of the tokens), with the kernels' own parallelism: the same bits on one
    thread as on two, forward and backward."""
    lengths = SPLITS[case]
    scores, values, state = packed_problem(lengths, H=4, D=16, dtype=torch.float32, with_state=True)
    cu = bounds(lengths)
    grad = torch.randn_like(values)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [t.detach().clone().requires_grad_() for t in (scores, values, *state)]
            out, (lse, final) = aaren.scan_varlen(leaves[0], leaves[1], cu, None, tuple(leaves[2:]))
            (out * grad).sum().add(final.sum()).backward()
            results.append([out.detach(), lse, final.detach()] + [leaf.grad for leaf in leaves])
    finally:
        torch.set_num_threads(threads)
    for single, double in zip(*results):
        assert torch.equal(single, double)


# ---------------------------------------------------------------- the rest of PyTorch

def opcheck_inputs(device, with_state, requires_grad, dtype=torch.float32):
    lengths = [3, 0, 1, 4]
    scores, values, state = packed_problem(lengths, dtype=dtype, device=device, with_state=with_state)
    tensors = [scores, values] + (list(state) if with_state else [None, None])
    tensors = [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]
    return tensors[0], tensors[1], bounds(lengths, device=device), max(lengths), tensors[2], tensors[3]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_opcheck_forward(device, with_state, requires_grad, dtype):
    torch.library.opcheck(torch.ops.aaren.scan_varlen_forward.default,
                          opcheck_inputs(device, with_state, requires_grad, dtype))


@pytest.mark.parametrize("with_state", [False, True])
def test_opcheck_without_max_seqlen_and_backward(device, with_state):
    s, v, cu, _, l0, o0 = opcheck_inputs(device, with_state, False)
    torch.library.opcheck(torch.ops.aaren.scan_varlen_forward.default, (s, v, cu, None, l0, o0))
    out, lse, _, _ = torch.ops.aaren.scan_varlen_forward(s, v, cu, None, l0, o0)
    for grad_out, grad_lse in [(torch.randn_like(out), None), (None, torch.randn_like(lse)),
                               (torch.randn_like(out), torch.randn_like(lse))]:
        torch.library.opcheck(torch.ops.aaren.scan_varlen_backward.default,
                              (grad_out, grad_lse, s, v, cu, 4, out, lse, l0, o0))


def test_meta_shapes():
    s = torch.empty(10, 3, device="meta")
    v = torch.empty(10, 3, 5, device="meta")
    cu = torch.empty(5, dtype=torch.int32, device="meta")
    out, lse, final_lse, final_out = torch.ops.aaren.scan_varlen_forward(s, v, cu, 8)
    assert out.shape == (10, 3, 5) and lse.shape == (10, 3)
    assert final_lse.shape == (4, 3) and final_out.shape == (4, 3, 5)
    assert lse.dtype == final_lse.dtype == final_out.dtype == torch.float64


def varlen_then_reduce(scores, values, cu, lse0, out0):
    out, (lse, last) = aaren.scan_varlen(scores, values, cu, 8, (lse0, out0))
    return out.sin().sum() + lse.sum() + last.sum()


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_forward_and_backward(device, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(varlen_then_reduce, fullgraph=True, dynamic=dynamic)
    for lengths in ([3, 0, 5, 1], [2, 8, 0, 4, 1]):
        scores, values, state = packed_problem(lengths, device=device, dtype=torch.float32,
                                               with_state=True)
        eager = [t.detach().clone().requires_grad_() for t in (scores, values, *state)]
        comp = [t.detach().clone().requires_grad_() for t in (scores, values, *state)]
        cu = bounds(lengths, device=device)
        expected = varlen_then_reduce(eager[0], eager[1], cu, *eager[2:])
        expected.backward()
        got = compiled(comp[0], comp[1], cu, *comp[2:])
        got.backward()
        torch.testing.assert_close(got, expected)
        for a, b in zip(comp, eager):
            torch.testing.assert_close(a.grad, b.grad, rtol=1.3e-6, atol=1e-5)


class VarlenModule(torch.nn.Module):
    def forward(self, scores, values, cu_seqlens, lse0, out0):
        out, (lse, last) = aaren.scan_varlen(scores, values, cu_seqlens, None, (lse0, out0))
        return out, lse, last


def test_export_with_dynamic_tokens_and_sequences(device):
    lengths = [3, 0, 5, 1]
    scores, values, state = packed_problem(lengths, device=device, dtype=torch.float32, with_state=True)
    tokens, sequences = torch.export.Dim("tokens", min=2), torch.export.Dim("sequences", min=2)
    cu_dim = sequences + 1
    exported = torch.export.export(
        VarlenModule(), (scores, values, bounds(lengths, device=device), *state),
        dynamic_shapes=({0: tokens}, {0: tokens}, {0: cu_dim}, {0: sequences}, {0: sequences}))
    assert any("aaren.scan_varlen_forward" in str(node.target) for node in exported.graph.nodes)
    other = [4, 4, 0, 2, 7, 1]
    scores, values, state = packed_problem(other, device=device, dtype=torch.float32, with_state=True)
    args = (scores, values, bounds(other, device=device), *state)
    for got, want in zip(exported.module()(*args), VarlenModule()(*args)):
        torch.testing.assert_close(got, want)


@torch.jit.script
def scripted_varlen(scores: torch.Tensor, values: torch.Tensor, cu_seqlens: torch.Tensor):
    out, state = aaren.scan_varlen(scores, values, cu_seqlens, None, None)
    more, state = aaren.scan_varlen(scores, values, cu_seqlens, 16, state)
    return out, more, state[0], state[1]


def test_torchscript(device, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        lengths = [3, 0, 5]
        scores, values, _ = packed_problem(lengths, device=device)
        cu = bounds(lengths, device=device)

        class Wrapper(torch.nn.Module):
            def forward(self, scores, values, cu_seqlens):
                return scripted_varlen(scores, values, cu_seqlens)

        path = tmp_path / "varlen.pt"
        torch.jit.script(Wrapper()).save(str(path))
        loaded = torch.jit.load(str(path))
        out, more, lse, final = loaded(scores, values, cu)
        want_out, state = aaren.scan_varlen(scores, values, cu)
        want_more, want_state = aaren.scan_varlen(scores, values, cu, None, state)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(more, want_more)
        torch.testing.assert_close(final, want_state[1])
        leaves = (scores.detach().clone().requires_grad_(), values.detach().clone().requires_grad_())
        # (Not the lse: the empty sequence's is -inf, whose finite differences are NaN.)
        assert torch.autograd.gradcheck(lambda s, v: [loaded(s, v, cu)[k] for k in (0, 1, 3)], leaves)


def test_autocast_casts_scores_and_values(device):
    lengths = [3, 2]
    scores, values, _ = packed_problem(lengths, device=device, dtype=torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, (lse, final) = aaren.scan_varlen(scores, values.bfloat16(), bounds(lengths, device=device))
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float64
