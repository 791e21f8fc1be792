"""The CPU kernels' split of long sequences into chunks (docs/design.md, "Performance on the
CPU"): chunk summaries, their combine, and a scan of every chunk from its carry, forward and
backward. AAREN_CPU_SEQUENCE_CHUNKS forces a chunk count, so the split runs here on problems
small enough for the float64 reference; every result is held to tolerance.py's rule.

The problems are scan_problems.py's mixed ones: scores rising and falling by 100 (the backward lowers
its reference inside chunks and across their boundaries, and the chunk summaries differ by
e^100), masked tokens, a masked prefix longer than a chunk of one token, and a state.
"""
import re

import pytest
import torch

import aaren
from naive import naive_scan, reference_scan
from scan_problems import (ALL_DTYPES, GRAD_MODES, NAMES, backward_rescales, check_gradients,
                           dtype_id, finite_outputs, gradients, mixed_problem, naive_outputs,
                           op_outputs, requiring_grad, seeds)
from tolerance import EPS, FACTOR, assert_close_to_reference, error_against

CHUNKS_VARIABLE = "AAREN_CPU_SEQUENCE_CHUNKS"
N = 50
# 3: chunks of 17, 17, 16 tokens; 7: six of 8 and one of 2; N: one token each; 4 N: more
# chunks asked than tokens (one token each).
CHUNK_COUNTS = [3, 7, N, 4 * N]


@pytest.fixture
def chunks(monkeypatch):
    def force(count):
        monkeypatch.setenv(CHUNKS_VARIABLE, str(count))
    return force


def scan_outputs(scores, values, state):
    """Every output of the forward: per-token out and lse, and the final state."""
    out, lse, final_out = torch.ops.aaren.scan_forward(scores, values, *(state or (None, None)))
    return out, lse, final_out


@pytest.mark.parametrize("count", CHUNK_COUNTS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_split_forward_within_plain_pytorch_error(chunks, dtype, with_state, count):
    scores, values, state = mixed_problem(2, N, 8, dtype, "cpu", with_state)
    chunks(count)
    out, lse, final_out = scan_outputs(scores, values, state)
    ref, ref_lse = reference_scan(scores, values, state)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    else:
        plain, plain_lse = naive_scan(scores, values, state, dtype=dtype)
        assert_close_to_reference(out, ref, plain, what="out")
        assert_close_to_reference(lse, ref_lse, plain_lse, what="lse")
    # The state's out after the last token, unrounded (float64), as the unsplit scan leaves it.
    chunks(1)
    _, _, whole_final_out = scan_outputs(scores, values, state)
    torch.testing.assert_close(final_out, whole_final_out, rtol=0,
                               atol=1e-5 if dtype != torch.float64 else 1e-13)


@pytest.mark.parametrize("count", CHUNK_COUNTS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES[1:], ids=dtype_id)
def test_split_backward_within_plain_pytorch_error(chunks, dtype, with_state, count):
    scores, values, state = mixed_problem(2, N, 8, dtype, "cpu", with_state)
    assert backward_rescales(reference_scan(scores, values, state)[1]) >= 8
    chunks(count)
    check_gradients(scores, values, state, *seeds(values, "out and lse", dtype))


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("count", [3, N])
@pytest.mark.parametrize("with_state", [False, True])
def test_split_backward_float64(chunks, with_state, count, mode):
    """float64 against autograd through the reference, to 1e-10 of the gradients' magnitude
    (as test_scan_backward.py's unsplit check), each output's gradient alone and together."""
    scores, values, state = mixed_problem(2, N, 8, torch.float64, "cpu", with_state)
    grad_out, grad_lse = seeds(values, mode, torch.float64)
    inputs = (scores, values, *(state or ()))
    chunks(count)
    ours = gradients(op_outputs, inputs, grad_out, grad_lse)
    exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse)
    for name, got, want in zip(NAMES, ours, exact):
        scale = max(want.abs().max().item(), 1e-300)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * scale, msg=f"d/d {name}")


@pytest.mark.parametrize("count", [2, 4, 9])
@pytest.mark.parametrize("with_state", [False, True])
def test_split_gradcheck(chunks, with_state, count):
    scores, values, state = mixed_problem(2, 9, 6, torch.float64, "cpu", with_state)
    chunks(count)
    inputs = requiring_grad(scores, values, *(state or ()))
    assert torch.autograd.gradcheck(finite_outputs, inputs)


@pytest.mark.parametrize("length", [0, 1, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_split_short_sequences(chunks, length, with_state):
    """Fewer tokens than chunks asked for: at most one chunk per token (N = 1 with a state is
    a step), and N = 0 leaves the state and zero gradients."""
    scores, values, state = mixed_problem(2, length, 3, torch.float64, "cpu", with_state)
    chunks(5)
    out, lse, final_out = scan_outputs(scores, values, state)
    ref, ref_lse = reference_scan(scores, values, state)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    inputs = (scores, values, *(state or ()))
    grad_out, grad_lse = seeds(values, "out and lse", torch.float64)
    ours = gradients(op_outputs, inputs, grad_out, grad_lse)
    exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse)
    for name, got, want in zip(NAMES, ours, exact):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"d/d {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_automatic_split_of_one_long_sequence(monkeypatch, dtype):
    """Unforced, sequences of 2048 tokens are split only when they would leave threads idle: on
    8 threads, 1 batch x 6 heads are cut in 4 chunks each (the plan wants 2 tasks per thread
    of 4 independent recurrences each, 64 in all, and chunks of 512 tokens at least), and
    the results are the 4-chunk ones, bit for bit, with errors within the rule's factor of
    the unsplit kernel's own (at 2048 tokens, scores from -100 to 100, the unsplit float32
    kernel's streaming sums already exceed 3x plain PyTorch's pairwise error in out and
    d/d scores: the rule against plain PyTorch is tested on 50 tokens). On one thread it is
    left whole: the split would read the values twice for no thread's gain."""
    monkeypatch.delenv(CHUNKS_VARIABLE, raising=False)
    threads = torch.get_num_threads()
    scores, values, state = mixed_problem(1, 2048, 16, dtype, "cpu", True)
    grad_out, grad_lse = seeds(values, "out and lse", dtype)
    inputs = (scores, values, *state)

    def run(count, thread_count):
        if count is None:
            monkeypatch.delenv(CHUNKS_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(CHUNKS_VARIABLE, str(count))
        torch.set_num_threads(thread_count)
        return scan_outputs(scores, values, state) + tuple(gradients(op_outputs, inputs, grad_out, grad_lse))

    try:
        automatic, split = run(None, 8), run(4, 8)
        automatic_one_thread, whole = run(None, 1), run(1, 1)
    finally:
        torch.set_num_threads(threads)
    assert scores.shape[0] * scores.shape[2] == 6
    for got, want in zip(automatic, split):
        assert torch.equal(got, want)
    for got, want in zip(automatic_one_thread, whole):
        assert torch.equal(got, want)
    assert any(not torch.equal(got, want) for got, want in zip(automatic[3:], whole[3:]))
    exact = gradients(naive_outputs(torch.float64), inputs, grad_out, grad_lse, lambda t: t.double())
    ref, ref_lse = reference_scan(scores, values, state)
    for name, got, want, unsplit in zip(["out", "lse"] + NAMES, automatic[:2] + automatic[3:],
                                        [ref, ref_lse] + exact, whole[:2] + whole[3:]):
        error, magnitude = error_against(got, want)
        unsplit_error, _ = error_against(unsplit, want)
        assert error <= FACTOR * unsplit_error + EPS[dtype] * magnitude, (name, error, unsplit_error)


@pytest.mark.parametrize("text", ["-1", "two", "3x", " 4", "+4"])
def test_bad_chunk_count_raises(chunks, text):
    scores, values, _ = mixed_problem(1, 8, 1, torch.float32, "cpu", False)
    chunks(text)
    with pytest.raises(RuntimeError, match=CHUNKS_VARIABLE + r" must be a non-negative integer "
                       r"\(or unset or empty\), got '" + re.escape(text)):
        aaren.scan(scores, values)


def test_empty_chunk_count_lets_the_kernels_choose(chunks):
    """Empty, as unset and 0: the kernels' own choice (docs/performance.md), the same bits."""
    scores, values, _ = mixed_problem(1, 600, 2, torch.float32, "cpu", False)
    chunks("0")
    chosen = scan_outputs(scores, values, None)
    chunks("")
    empty = scan_outputs(scores, values, None)
    for got, want in zip(empty, chosen):
        assert torch.equal(got, want)
