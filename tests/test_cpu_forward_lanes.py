"""The CPU forward's two walks over a task's lanes (csrc/ops/cpu/forward_lanes.h): a task
whose lanes (sequences) fill half a vector takes its weights e^(s - m) as vectors over the
lanes; a task with fewer takes them lane by lane, a block of tokens to a vector. How many lanes
a task has depends on the thread count (csrc/ops/cpu/work_plan.cpp), so the two walks must
give the same bits, or results would change with torch.set_num_threads.

B = 1 and H = 16, never split into chunks: one thread runs one task of 16 lanes (by vectors),
two threads four tasks of 4, four threads eight of 2, eight threads sixteen of 1 (lane by
lane, in every build: the widest float vector has 16 lanes, the float64 one 8). The tests
run the build this CPU selects, and again, in a fresh process, the lower builds it can run.
"""
import pytest
import torch

import aaren  # noqa: F401  (registers torch.ops.aaren)
from lower_isa import CAPABILITIES, rerun_on
from naive import naive_scan, reference_scan
from scan_problems import ALL_DTYPES, dtype_id, mixed_problem
from tolerance import assert_close_to_reference

THREADS = (1, 2, 4, 8)
# N = 45 ends the lane-by-lane walk in a partial block of tokens (16 or 8 to a block).
SHAPES = [(1, 45, 16, 8), (1, 300, 16, 33)]


def bits(t):
    """A tensor's bytes, so that comparisons see -0.0 and NaN payloads."""
    return t.contiguous().view(torch.uint8)


def on_threads(threads, fn, *args):
    """fn(*args) with torch's thread count set to `threads`, restored afterwards."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn(*args)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def never_split(monkeypatch):
    # A split sums in another order, so that split and whole differ in the last bits
    # (docs/performance.md); with one chunk per sequence only the lanes per task change with the threads.
    monkeypatch.setenv("AAREN_CPU_SEQUENCE_CHUNKS", "1")


@pytest.mark.parametrize("with_state", [False, True], ids=["no state", "state"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_same_bits_on_any_thread_count(dtype, shape, with_state):
    """Every kind of score (scan_problems.mixed_scores: masked -inf tokens, rising and falling
    ramps that move the maximum, levels far apart), one head with +inf and one with a NaN,
    and a state or none: the outputs (out, lse, final out) are the same bytes on 1, 2, 4 and 8
    threads, and close to the float64 reference."""
    B, N, H, D = shape
    scores, values, state = mixed_problem(B, N, D, dtype, "cpu", with_state, H=H)
    scores[0, N // 2, 7] = float("inf")
    scores[0, N // 3, 8] = float("nan")
    results = {threads: on_threads(threads, torch.ops.aaren.scan_forward, scores, values,
                                   *(state or (None, None))) for threads in THREADS}
    for threads in THREADS[1:]:
        for one, many in zip(results[1], results[threads]):
            assert torch.equal(bits(one), bits(many)), f"{threads} threads"

    out, lse, _ = results[1]
    finite = [h for h in range(H) if h not in (7, 8)]
    ref, ref_lse = reference_scan(scores[..., finite], values[..., finite, :], state and (
        state[0][:, finite], state[1][:, finite]))
    if dtype == torch.float64:
        torch.testing.assert_close(out[..., finite, :], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse[..., finite], ref_lse, rtol=1e-12, atol=1e-12)
    else:
        plain, plain_lse = naive_scan(scores[..., finite], values[..., finite, :], state and (
            state[0][:, finite], state[1][:, finite]), dtype=dtype)
        assert_close_to_reference(out[..., finite, :], ref, plain, what="out")
        assert_close_to_reference(lse[..., finite], ref_lse, plain_lse, what="lse")
    # The NaN head is NaN from its NaN on; the +inf head's out is its value at the +inf.
    assert out[0, N // 3:, 8].isnan().all() and not out[0, :N // 3, 8].isnan().any()
    assert torch.equal(out[0, N // 2, 7], values[0, N // 2, 7])


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_lower_instruction_sets_give_the_same_bits(capability):
    """This file's other tests on the AVX2 build (8 floats to a vector) and the DEFAULT one,
    in a fresh process with ATEN_CPU_CAPABILITY lowered: aaren lowers its choice alike."""
    rerun_on(capability, __file__, "lower_instruction_sets")
