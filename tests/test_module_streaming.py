"""Aaren's streaming interface: step (token by token) and prefill (in chunks, empty ones
included, with padding) give what the forward gives and continue each other's state,
gradients flow through a prefilled state, and the state's size stays constant over 10,000
steps, for Aaren and AarenEncoder alike.
"""
import math

import pytest
import torch

from aaren import Aaren, AarenEncoder, AarenEncoderLayer
from module_reference import F64, MODULE_MARKS, close, randn, reference_aaren

pytestmark = MODULE_MARKS


# ------------------------------------------------------------------------- streaming

@pytest.mark.parametrize("batch_first", [True, False])
def test_step_and_prefill_match_forward(device, batch_first):
    attn = Aaren(8, 2, batch_first=batch_first, device=device, dtype=F64)
    x = randn(2, 9, 8, device=device)  # batch-first view of the sequence
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    y = layout(attn(layout(x), layout(x), layout(x))[0])
    state = None
    outs = []
    for t in range(9):
        out, state = attn.step(x[:, t], state)
        outs.append(out)
    close(torch.stack(outs, 1), y)
    chunks, state = [], None
    for lo, hi in [(0, 4), (4, 4), (4, 5), (5, 9)]:  # includes an empty chunk
        out, state = attn.prefill(layout(x[:, lo:hi]), state)
        chunks.append(layout(out))
    close(torch.cat(chunks, 1), y)
    # a state from prefill continues with step, and vice versa
    _, state = attn.prefill(layout(x[:, :5]))
    for t in range(5, 7):
        out, state = attn.step(x[:, t], state)
        close(out, y[:, t])
    out, _ = attn.prefill(layout(x[:, 7:]), state)
    close(layout(out), y[:, 7:])


def test_prefill_with_padding_gives_each_sequence_its_state(device):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    x = randn(2, 6, 8, device=device)
    lengths = [6, 3]
    padding = (torch.arange(6).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)).to(device)
    _, state = attn.prefill(x, key_padding_mask=padding)
    nxt = randn(2, 8, device=device)
    y, _ = attn.step(nxt, state)
    for i, n in enumerate(lengths):
        seq = torch.cat([x[i:i + 1, :n], nxt[i].view(1, 1, 8)], 1)
        close(y[i], attn(seq, seq, seq)[0][0, -1])


def test_prefill_gradients_flow_through_state(device):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    prompt, x = randn(2, 3, 8, device=device), randn(2, 4, 8, device=device)
    g = randn(2, 4, 8, device=device)
    params = list(attn.parameters())
    _, state = attn.prefill(prompt)
    y, _ = attn.prefill(x, state)
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(reference_aaren(attn, x, prefix_state=prompt), params, g)
    for a, b in zip(got, want):
        close(a, b, atol=1e-9, rtol=1e-7)


def test_state_size_is_constant_over_10000_steps(device):
    attn = Aaren(4, 2, device=device).eval()

    def footprint(states):
        return [(tuple(t.shape), t.dtype, t.untyped_storage().nbytes()) for s in states for t in s]

    x = torch.randn(1, 4, device=device)
    with torch.no_grad():
        _, state = attn.step(x)
        after_one = footprint([state])
        for _ in range(10_000 - 1):
            _, state = attn.step(x, state)
        assert footprint([state]) == after_one
        # (lse [B, H], out [B, H, D]), each storage exactly its own size (the dtypes are
        # the operators' business: test_scan_forward.py)
        assert [shape for shape, _, _ in after_one] == [(1, 2), (1, 2, 2)]
        assert all(nbytes == math.prod(shape) * dtype.itemsize
                   for shape, dtype, nbytes in after_one)
        # prefill's state does not hold on to the sequence either, nor do the encoder's
        _, short = attn.prefill(torch.randn(2, 1, 4, device=device))
        _, long = attn.prefill(torch.randn(500, 1, 4, device=device), short)
        assert footprint([short]) == footprint([long]) == after_one
        encoder = AarenEncoder(AarenEncoderLayer(4, 2, 8, batch_first=True, device=device),
                               2).eval()
        _, states = encoder.step(x)
        _, states = encoder.prefill(torch.randn(1, 500, 4, device=device), states)
        for _ in range(100):
            _, states = encoder.step(x, states)
        assert footprint(states) == after_one * 2


def test_step_of_a_non_tensor_is_a_type_error_naming_x():
    """Found by fuzzing: a list raised AttributeError ('list' object has no attribute 'dim')."""
    token = [0.0, 1.0, 2.0, 3.0]
    attn = Aaren(4, 2).eval()
    layer = AarenEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, norm_first=True).eval()
    encoder = AarenEncoder(AarenEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0), 2).eval()
    for where, call in [("Aaren.step", lambda: attn.step(token)),
                        ("Aaren.prefill", lambda: attn.prefill(token)),
                        ("AarenEncoderLayer.step", lambda: layer.step(token)),
                        ("AarenEncoder.step", lambda: encoder.step(token))]:
        with pytest.raises(TypeError, match=f"{where}: x must be a Tensor, got list"):
            call()
