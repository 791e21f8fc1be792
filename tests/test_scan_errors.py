"""aaren.scan's, aaren.step's and the scan operator's errors on bad input, on every device
present: wrong shapes, dtypes, strides, mismatched dimensions of scores, values and state, a
half-given state, and inputs on different devices, each with its own clear message.
"""
import pytest
import torch

import aaren
from scan_problems import random_problem


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


# ---------------------------------------------------------------- the _into forms' buffers

def test_into_outputs_overlapping_each_other():
    """Found by fuzzing (test_fuzz_ops.py): lse and final_out in one storage were written
    over each other silently."""
    B, N, H, D = 2, 5, 2, 3
    scores, values = torch.randn(B, N, H), torch.randn(B, N, H, D)
    buffer = torch.zeros(100, dtype=torch.float64)
    lse, final_out = buffer[:B * N * H].view(B, N, H), buffer[:B * H * D].view(B, H, D)
    with pytest.raises(RuntimeError, match="the outputs lse and final_out share memory"):
        torch.ops.aaren.scan_forward_into(scores, values, None, None, torch.empty(B, N, H, D),
                                          lse, final_out)
    # Disjoint parts of one storage are fine.
    lse, final_out = buffer[:B * N * H].view(B, N, H), buffer[B * N * H:][:B * H * D].view(B, H, D)
    torch.ops.aaren.scan_forward_into(scores, values, None, None, torch.empty(B, N, H, D),
                                      lse, final_out)
    out, want_lse, want_final = torch.ops.aaren.scan_forward(scores, values)
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(final_out, want_final)


def test_into_backward_outputs_overlapping_each_other():
    B, N, H, D = 2, 5, 2, 3
    scores, values = torch.randn(B, N, H), torch.randn(B, N, H, D)
    out, lse, _ = torch.ops.aaren.scan_forward(scores, values)
    grads = torch.empty(B * N * H * D)
    with pytest.raises(RuntimeError, match="the outputs grad_scores and grad_values share memory"):
        torch.ops.aaren.scan_backward_into(
            torch.ones_like(out), None, scores, values, out, lse, None, None,
            grads[:B * N * H].view(B, N, H), grads.view(B, N, H, D),
            torch.empty(B, H, dtype=torch.float64), torch.empty(B, H, D, dtype=torch.float64))


def test_into_output_aliasing_an_input():
    """The error names both (it was PyTorch's 'refer to a single memory location')."""
    scores, values = torch.randn(2, 5, 2), torch.randn(2, 5, 2, 3)
    with pytest.raises(RuntimeError, match="the output out shares memory with the input values"):
        torch.ops.aaren.scan_forward_into(scores, values, None, None, values,
                                          torch.empty(2, 5, 2, dtype=torch.float64),
                                          torch.empty(2, 2, 3, dtype=torch.float64))
