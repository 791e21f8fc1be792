"""The CPU kernels' streaming (non-temporal) stores of their outputs (csrc/ops/cpu/work_plan.cpp,
"Streaming stores", and vec_io.h): the stores that skip the caches must write the very bits the plain ones
do, forward and backward, in every dtype, with rows that end in a partial vector, with
outputs not aligned to a vector, and with a split sequence. AAREN_CPU_STREAMING_STORES=1
streams whatever the size and 0 never does, so both paths run here on small problems.

Where the instruction set has no streaming store (the DEFAULT build) both runs take plain
stores and agree trivially; on the AVX2 and AVX512 builds they differ. The tests run the
build this CPU selects, and again, in a fresh process, the lower builds it can run.
"""
import pytest
import torch

import aaren  # noqa: F401  (registers torch.ops.aaren)
from lower_isa import CAPABILITIES, rerun_on
from scan_problems import ALL_DTYPES, dtype_id, mixed_problem

STREAMING_VARIABLE = "AAREN_CPU_STREAMING_STORES"
# D = 64 fills whole vectors; D = 40 ends every row in a partial one; H = 16 fills whole
# float64 vectors of lse per token (those stream too), H = 6 does not.
SHAPES = [(3, 37, 16, 64), (2, 45, 6, 40), (1, 300, 6, 64)]


def forward_and_backward(scores, values, state, grad_out, grad_lse):
    out, lse, final_out = torch.ops.aaren.scan_forward(scores, values, *(state or (None, None)))
    grads = torch.ops.aaren.scan_backward(grad_out, grad_lse, scores, values, out, lse,
                                          *(state or (None, None)))
    return (out, lse, final_out, *grads)


def bits(t):
    """A tensor's bytes, so that comparisons see -0.0 and NaN payloads."""
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("chunks", ["1", "3"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_streamed_outputs_are_the_plain_stores_bits(monkeypatch, dtype, shape, with_state, chunks):
    B, N, H, D = shape
    torch.manual_seed(0)
    scores, values, state = mixed_problem(B, N, D, dtype, "cpu", with_state, H=H)
    grad_out = torch.randn_like(values)
    grad_lse = torch.randn(B, N, H, dtype=torch.float64)
    monkeypatch.setenv("AAREN_CPU_SEQUENCE_CHUNKS", chunks)
    results = {}
    for streaming in ["0", "1"]:
        monkeypatch.setenv(STREAMING_VARIABLE, streaming)
        results[streaming] = forward_and_backward(scores, values, state, grad_out, grad_lse)
    for plain, streamed in zip(results["0"], results["1"], strict=True):
        assert torch.equal(bits(plain), bits(streamed))


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_streaming_into_buffers_off_vector_alignment(monkeypatch, dtype, offset):
    """out, lse and grad_values `offset` elements into their storage: not aligned to a vector
    (for offset > 0), where a streaming store would fault; those vectors take plain stores."""
    B, N, H, D = 2, 33, 16, 64
    torch.manual_seed(1)
    scores, values, _ = mixed_problem(B, N, D, dtype, "cpu", False, H=H)
    grad_out = torch.randn_like(values)

    def offset_buffer(shape, dtype):
        numel = 1
        for size in shape:
            numel *= size
        return torch.full((numel + offset,), float("nan"), dtype=dtype)[offset:].view(shape)

    results = {}
    for streaming in ["0", "1"]:
        monkeypatch.setenv(STREAMING_VARIABLE, streaming)
        out = offset_buffer((B, N, H, D), dtype)
        lse = offset_buffer((B, N, H), torch.float64)
        final_out = torch.empty(B, H, D, dtype=torch.float64)
        torch.ops.aaren.scan_forward_into(scores, values, None, None, out, lse, final_out)
        grads = [offset_buffer((B, N, H), dtype), offset_buffer((B, N, H, D), dtype),
                 torch.empty(B, H, dtype=torch.float64), torch.empty(B, H, D, dtype=torch.float64)]
        torch.ops.aaren.scan_backward_into(grad_out, None, scores, values, out, lse, None, None,
                                           *grads)
        results[streaming] = (out, lse, final_out, *grads)
    for plain, streamed in zip(results["0"], results["1"], strict=True):
        assert torch.equal(bits(plain), bits(streamed))
    # and they are the allocating op's results
    monkeypatch.delenv(STREAMING_VARIABLE)
    out, lse, _ = torch.ops.aaren.scan_forward(scores, values)
    assert torch.equal(bits(results["1"][0]), bits(out))
    assert torch.equal(bits(results["1"][1]), bits(lse))


@pytest.mark.parametrize("text", ["2", "yes", "-1", " 1"])
def test_a_bad_streaming_setting_is_a_clear_error(monkeypatch, text):
    monkeypatch.setenv(STREAMING_VARIABLE, text)
    scores, values, _ = mixed_problem(1, 8, 4, torch.float32, "cpu", False, H=6)
    with pytest.raises(RuntimeError, match="AAREN_CPU_STREAMING_STORES must be 0 or 1"):
        torch.ops.aaren.scan_forward(scores, values)


def test_an_empty_streaming_setting_chooses(monkeypatch):
    scores, values, _ = mixed_problem(1, 8, 4, torch.float32, "cpu", False, H=6)
    monkeypatch.setenv(STREAMING_VARIABLE, "0")
    expected = torch.ops.aaren.scan_forward(scores, values)
    monkeypatch.setenv(STREAMING_VARIABLE, "")
    for a, b in zip(torch.ops.aaren.scan_forward(scores, values), expected, strict=True):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_lower_instruction_sets_stream_the_same_bits(capability):
    """This file's other tests on the AVX2 build (32-byte streaming stores) and the DEFAULT one
    (none), in a fresh process with ATEN_CPU_CAPABILITY lowered: aaren lowers its choice alike."""
    rerun_on(capability, __file__, "lower_instruction_sets")
