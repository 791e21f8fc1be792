"""The reference and helpers shared by the tests of the nn.Module layer (test_module_*.py,
test_convert.py): `reference_aaren`, written from the definition (per-head softmax
attention of the learned query over each prefix, with the module's own projections, in
float64) and sharing no code with aaren.modules, `reference_encoder_layer` around it, a
float64 `close`, the float attention masks the tests build, and the marks every module test
file applies (MODULE_MARKS). Not a test module: it holds no tests.
"""
import math

import pytest
import torch
import torch.nn.functional as F

MODULE_MARKS = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*TorchScript.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*nested tensors is in prototype.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True.*:UserWarning"),
]


F64 = torch.float64


def reference_aaren(attn, key_x, value_x=None, key_padding_mask=None, batch_first=None,
                    prefix_state=None):
    """Output of `attn` by definition, float64. key_x/value_x in the module's layout
    ([B, N, E] if batch_first else [N, B, E]). Tokens given in `prefix_state`
    ([B, M, E] batch-first) are seen before key_x (the reference for continuing a state)."""
    value_x = key_x if value_x is None else value_x
    batch_first = attn.batch_first if batch_first is None else batch_first
    if not batch_first:
        key_x, value_x = key_x.transpose(0, 1), value_x.transpose(0, 1)
    kx, vx = key_x.to(F64), value_x.to(F64)
    if prefix_state is not None:
        kx = torch.cat([prefix_state.to(F64), kx], 1)
        vx = torch.cat([prefix_state.to(F64), vx], 1)
    b, n, e = kx.shape
    h = attn.num_heads
    d = e // h

    def linear(x, lin):
        y = x @ lin.weight.to(F64).T
        return y if lin.bias is None else y + lin.bias.to(F64)

    k = linear(kx, attn.k_proj).view(b, n, h, d)
    v = linear(vx, attn.v_proj).view(b, n, h, d)
    q = attn.query.to(F64)
    s = torch.einsum("bnhd,hd->bnh", k, q) / math.sqrt(d)
    if key_padding_mask is not None:
        m = key_padding_mask
        if prefix_state is not None:
            m = torch.cat([torch.zeros(b, prefix_state.size(1), dtype=m.dtype, device=m.device), m], 1)
        if m.dtype == torch.bool:
            s = s.masked_fill(m.unsqueeze(-1), float("-inf"))
        else:
            s = s + m.to(F64).unsqueeze(-1)
    outs = []
    for t in range(n):  # attention of the query over tokens 0..t
        prefix = s[:, : t + 1]
        empty = torch.isneginf(prefix).all(dim=1, keepdim=True)  # [B, 1, H]
        w = torch.softmax(prefix.masked_fill(empty, 0.0), dim=1).masked_fill(empty, 0.0)
        outs.append(torch.einsum("bih,bihd->bhd", w, v[:, : t + 1]))
    out = torch.stack(outs, 1).reshape(b, n, e)
    if prefix_state is not None:
        out = out[:, prefix_state.size(1):]
    y = linear(out, attn.out_proj)
    return y if batch_first else y.transpose(0, 1)


def reference_encoder_layer(layer, x, key_padding_mask=None):
    """nn.TransformerEncoderLayer's computation (no dropout) around reference_aaren."""
    def norm(ln, t):
        return F.layer_norm(t, ln.normalized_shape, ln.weight.to(F64),
                            None if ln.bias is None else ln.bias.to(F64), ln.eps)

    def ff(t):
        hidden = layer.activation(F.linear(t, layer.linear1.weight.to(F64),
                                           None if layer.linear1.bias is None else layer.linear1.bias.to(F64)))
        return F.linear(hidden, layer.linear2.weight.to(F64),
                        None if layer.linear2.bias is None else layer.linear2.bias.to(F64))

    x = x.to(F64)
    if layer.norm_first:
        x = x + reference_aaren(layer.self_attn, norm(layer.norm1, x), key_padding_mask=key_padding_mask)
        return x + ff(norm(layer.norm2, x))
    x = norm(layer.norm1, x + reference_aaren(layer.self_attn, x, key_padding_mask=key_padding_mask))
    return norm(layer.norm2, x + ff(x))


def close(a, b, atol=1e-10, rtol=1e-8):
    torch.testing.assert_close(a.to(F64), b.to(F64), atol=atol, rtol=rtol)


def randn(*shape, device="cpu", dtype=F64):
    return torch.randn(*shape, device=device, dtype=dtype)


def _float_mask(masked, fill, dtype):
    """0 where `masked` (bool) is False, `fill` where it is True, converted to `dtype` (as a
    float32 mask cast to float16 would be: -1e9 becomes -inf there)."""
    mask = torch.zeros(masked.shape, dtype=F64, device=masked.device).masked_fill(masked, fill)
    return mask.to(dtype)
