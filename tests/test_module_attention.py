"""Aaren as a drop-in for nn.MultiheadAttention: its forward and gradients against the float64
reference (batch-first or not, with or without bias, any number of heads, unbatched input;
the query only fixes the shape, keys give the scores and values the values), dropout of whole
token contributions, its parameters, their initialization and count, dtype and device
handling like nn.Linear, the state_dict round trip, and autocast.
"""
import copy
import io
import math

import pytest
import torch
from torch import nn

from aaren import Aaren, AarenEncoder, AarenEncoderLayer
from module_reference import F64, MODULE_MARKS, close, randn, reference_aaren

pytestmark = MODULE_MARKS


# ------------------------------------------------------------------------- Aaren forward

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_forward_matches_reference(device, batch_first, bias, heads):
    attn = Aaren(8, heads, bias=bias, batch_first=batch_first, device=device, dtype=F64)
    x = randn(3, 7, 8, device=device) if batch_first else randn(7, 3, 8, device=device)
    y, weights = attn(x, x, x)
    assert weights is None
    assert y.shape == x.shape and y.dtype == F64 and y.device == x.device
    close(y, reference_aaren(attn, x))


def test_unbatched_input(device):
    for batch_first in (True, False):
        attn = Aaren(8, 2, batch_first=batch_first, device=device, dtype=F64)
        x = randn(6, 8, device=device)
        mask = torch.tensor([False, True, False, False, True, False], device=device)
        y, _ = attn(x, x, x, key_padding_mask=mask)
        assert y.shape == (6, 8)
        close(y, reference_aaren(attn, x.unsqueeze(0), key_padding_mask=mask.unsqueeze(0),
                                 batch_first=True)[0])


def test_query_only_fixes_shape_key_gives_scores_value_gives_values(device):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    kx, vx = randn(2, 5, 8, device=device), randn(2, 5, 8, device=device)
    y1, _ = attn(kx, kx, vx)
    y2, _ = attn(randn(2, 5, 8, device=device), kx, vx)
    close(y1, y2, atol=0, rtol=0)
    close(y1, reference_aaren(attn, kx, vx))
    with pytest.raises(ValueError, match="same shape"):
        attn(randn(2, 4, 8, device=device), kx, vx)  # cross-attention shapes
    with pytest.raises(ValueError, match="embed_dim"):
        bad = randn(2, 5, 6, device=device)
        attn(bad, bad, bad)


def test_gradients_match_reference(device):
    """Gradients reach the learned query and k_proj through the folded score projection."""
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    with torch.no_grad():
        attn.k_proj.bias.normal_()
        attn.v_proj.bias.normal_()
    x = randn(2, 6, 8, device=device).requires_grad_()
    mask = torch.zeros(2, 6, dtype=torch.bool, device=device)
    mask[0, :2] = True  # a fully masked prefix
    mask[1, 3] = True
    g = randn(2, 6, 8, device=device)
    params = [p for _, p in sorted(attn.named_parameters())]
    grads = torch.autograd.grad(attn(x, x, x, key_padding_mask=mask)[0], [x] + params, g)
    expected = torch.autograd.grad(reference_aaren(attn, x, key_padding_mask=mask), [x] + params, g)
    for name, got, want in zip(["input"] + sorted(dict(attn.named_parameters())), grads, expected):
        assert torch.isfinite(got).all(), name
        close(got, want, atol=1e-9, rtol=1e-7)
    assert grads[1 + sorted(dict(attn.named_parameters())).index("query")].abs().max() > 1e-3


# ------------------------------------------------------------------------- dropout

def test_dropout_drops_whole_token_contributions(device):
    """p on (batch, token, head): a head's output for a single token is 0 or v / (1 - p)."""
    p = 0.25
    attn = Aaren(4, 2, dropout=p, batch_first=True, device=device, dtype=F64)
    with torch.no_grad():
        attn.out_proj.weight.copy_(torch.eye(4, dtype=F64, device=device))
        attn.out_proj.bias.zero_()
    x = randn(4000, 1, 4, device=device)
    v = attn.v_proj(x).detach().view(4000, 2, 2)
    y = attn(x, x, x)[0].detach().view(4000, 2, 2)
    kept = (y - v / (1 - p)).abs().amax(-1) < 1e-12
    dropped = y.abs().amax(-1) == 0
    assert bool((kept | dropped).all())
    assert abs(dropped.double().mean().item() - p) < 0.03
    # heads are dropped independently
    assert abs((dropped[:, 0] != dropped[:, 1]).double().mean().item() - 2 * p * (1 - p)) < 0.04
    ys, _ = attn.step(x[:, 0])
    ys = ys.detach().view(4000, 2, 2)
    assert bool((((ys - v / (1 - p)).abs().amax(-1) < 1e-12) | (ys.abs().amax(-1) == 0)).all())
    attn.eval()
    close(attn(x, x, x)[0].view(4000, 2, 2), v)


def test_dropout_is_unbiased_and_off_in_eval(device):
    attn = Aaren(4, 2, dropout=0.5, batch_first=True, device=device, dtype=F64)
    x = randn(1, 4, 4, device=device).expand(6000, 4, 4)
    mean = attn(x, x, x)[0].detach().mean(0)
    attn.eval()
    expected = attn(x, x, x)[0][0]
    close(mean, expected, atol=0.08, rtol=0)
    close(attn(x, x, x)[0], reference_aaren(attn, x))


# ------------------------------------------------------------------------- module basics

def test_parameters_init_and_count(device):
    e, h = 64, 4
    attn = Aaren(e, h, device=device)
    names = sorted(n for n, _ in attn.named_parameters())
    assert names == ["k_proj.bias", "k_proj.weight", "out_proj.bias", "out_proj.weight", "query",
                     "v_proj.bias", "v_proj.weight"]
    count = sum(p.numel() for p in attn.parameters())
    assert count == 3 * e * e + 4 * e
    mha = nn.MultiheadAttention(e, h, device=device)
    assert sum(p.numel() for p in mha.parameters()) - count == e * e
    assert sum(p.numel() for p in Aaren(e, h, bias=False, device=device).parameters()) == \
        3 * e * e + e
    assert attn.query.shape == (h, e // h)
    bound = math.sqrt(6 / (4 * e))
    for w in (attn.k_proj.weight, attn.v_proj.weight):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    for b in (attn.k_proj.bias, attn.v_proj.bias, attn.out_proj.bias):
        assert b.abs().max() == 0
    big = Aaren(1024, 4, device=device)
    assert abs(big.query.std().item() - math.sqrt(0.5)) < 0.05
    assert list(attn.state_dict()) == ["query", "k_proj.weight", "k_proj.bias", "v_proj.weight",
                                       "v_proj.bias", "out_proj.weight", "out_proj.bias"]


def test_dtype_and_device_like_linear(device):
    attn = Aaren(8, 2, device=device, dtype=F64)
    assert all(p.dtype == F64 and p.device.type == device.type for p in attn.parameters())
    attn = Aaren(8, 2).to(device=device, dtype=F64)
    x = randn(4, 2, 8, device=device)
    assert attn(x, x, x)[0].dtype == F64
    with pytest.raises(RuntimeError):
        attn(x.float(), x.float(), x.float())
    with pytest.raises(ValueError):
        Aaren(10, 3)


def test_state_dict_round_trip(device):
    kw = dict(device=device, dtype=F64)
    attn = Aaren(8, 2, batch_first=True, **kw)
    buf = io.BytesIO()
    torch.save(attn.state_dict(), buf)
    buf.seek(0)
    other = Aaren(8, 2, batch_first=True, **kw)
    other.load_state_dict(torch.load(buf))
    x = randn(2, 5, 8, device=device)
    close(other(x, x, x)[0], attn(x, x, x)[0], atol=0, rtol=0)
    enc = AarenEncoder(AarenEncoderLayer(8, 2, 16, batch_first=True, **kw), 2,
                       norm=nn.LayerNorm(8, **kw)).eval()
    enc2 = AarenEncoder(AarenEncoderLayer(8, 2, 16, batch_first=True, **kw), 2,
                        norm=nn.LayerNorm(8, **kw)).eval()
    enc2.load_state_dict(copy.deepcopy(enc.state_dict()))
    close(enc2(x), enc(x), atol=0, rtol=0)


# ------------------------------------------------------------------------- autocast

def test_autocast(device):
    dtypes = [torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    attn = Aaren(16, 2, batch_first=True, device=device)
    x = torch.randn(2, 9, 16, device=device)
    ref = attn(x, x, x)[0]
    for dtype in dtypes:
        with torch.autocast(device.type, dtype=dtype):
            y = attn(x, x, x)[0]
            outs, state = [], None
            for t in range(9):
                out, state = attn.step(x[:, t], state)
                outs.append(out)
        assert y.dtype == dtype
        # (lse, out); their dtypes are the operators' business (test_scan_forward.py)
        assert state[0].shape == (2, 2) and state[1].shape == (2, 2, 8)
        close(y, ref, atol=0.05, rtol=0.05)
        close(torch.stack(outs, 1), y, atol=0.02, rtol=0.02)
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32
                   for p in attn.parameters())
        attn.zero_grad()


def test_input_in_another_dtype_than_the_module_is_named():
    """Found by fuzzing: it was F.linear's 'mat1 and mat2 must have the same dtype'."""
    attn = Aaren(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8, dtype=F64)
    with pytest.raises(RuntimeError, match=r"query, key and value must have the dtype of the "
                                        r"module's parameters \(torch.float32\), got torch.float64"):
        attn(x, x, x)
    with pytest.raises(RuntimeError, match="Aaren: x must have the dtype"):
        attn.prefill(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        y, _ = attn(x.float(), x.float(), x.float())
    assert y.shape == x.shape
