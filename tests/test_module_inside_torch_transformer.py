"""Aaren inside PyTorch's own transformer modules: assigned to, or converted into,
nn.TransformerEncoderLayer, nn.TransformerEncoder and nn.TransformerDecoderLayer, Aaren.forward
is called (PyTorch's fused and nested-tensor fast paths never bypass it) in training and eval,
with and without gradients and padding, with results matching the float64 reference; and
nested-tensor input.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aaren import Aaren, convert
from module_reference import F64, MODULE_MARKS, close, randn, reference_aaren, reference_encoder_layer

pytestmark = MODULE_MARKS


# ------------------------------------------------------------------------- inside nn.Transformer*

def _layer(device="cpu", **kw):
    # every condition of PyTorch's fused inference path holds except what Aaren controls
    kw = {"dropout": 0.0, "batch_first": True, **kw}
    return nn.TransformerEncoderLayer(8, 2, 16, device=device, dtype=F64, **kw)


@pytest.fixture
def no_fused_paths(monkeypatch):
    """Fails if PyTorch's fused kernels run, and counts the calls of Aaren.forward (patched
    on the class: a forward hook would itself disable the fused path)."""
    def fused(*args, **kwargs):
        raise AssertionError("a fused attention path bypassed Aaren.forward")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    monkeypatch.setattr(torch, "_native_multi_head_attention", fused)
    calls = []
    forward = Aaren.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Aaren, "forward", counting)
    return calls


def _assign(model):
    for module in model.modules():
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            module.self_attn = Aaren.from_multihead_attention(module.self_attn)
    return model


@pytest.mark.parametrize("how", ["layer", "encoder built before assigning", "converted encoder"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("padding", [False, True])
def test_aaren_is_called_inside_transformer_layers(no_fused_paths, device, how, training, grad,
                                                   padding):
    if how == "layer":
        model = _assign(_layer(device))
        layers = [model]
    elif how == "encoder built before assigning":
        model = nn.TransformerEncoder(_layer(device), 2)
        assert model.use_nested_tensor  # PyTorch would build nested tensors in eval
        _assign(model)
        layers = list(model.layers)
    else:
        model = convert(nn.TransformerEncoder(_layer(device), 2))
        assert not model.use_nested_tensor
        layers = list(model.layers)
    model.train(training)
    x = randn(3, 6, 8, device=device)
    mask = None
    if padding:
        mask = torch.zeros(3, 6, dtype=torch.bool, device=device)
        mask[1, 4:] = True  # right padding (what the nested-tensor path accepts)
        mask[2, 2:] = True
    with torch.set_grad_enabled(grad):
        y = model(x, src_key_padding_mask=mask)
    assert len(no_fused_paths) == len(layers)
    expected = x
    for layer in layers:
        expected = reference_encoder_layer(layer, expected, mask)
    keep = torch.ones(3, 6, dtype=torch.bool, device=device) if mask is None else ~mask
    close(y[keep], expected[keep])  # (PyTorch's nested path returns 0 at padded positions)


def test_aaren_is_called_inside_decoder_layer(no_fused_paths, device):
    dec = convert(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                             device=device, dtype=F64))
    assert isinstance(dec.self_attn, Aaren) and isinstance(dec.multihead_attn, nn.MultiheadAttention)
    tgt, memory = randn(2, 5, 8, device=device), randn(2, 7, 8, device=device)
    causal = nn.Transformer.generate_square_subsequent_mask(5, device=device, dtype=F64)
    for training in (True, False):
        dec.train(training)
        no_fused_paths.clear()
        y = dec(tgt, memory, tgt_mask=causal, tgt_is_causal=True)
        assert len(no_fused_paths) == 1
        x = F.layer_norm(tgt + reference_aaren(dec.self_attn, tgt), (8,), dec.norm1.weight,
                         dec.norm1.bias)
        x = dec.norm2(x + dec.multihead_attn(x, memory, memory, need_weights=False)[0])
        close(y, dec.norm3(x + dec.linear2(F.relu(dec.linear1(x)))))
    with pytest.raises(ValueError, match="causal by construction"):
        dec(tgt, memory, tgt_mask=torch.zeros(5, 5, device=device, dtype=F64))


def test_nested_tensor_input(device):
    attn = Aaren(8, 2, batch_first=True, device=device, dtype=F64)
    seqs = [randn(5, 8, device=device), randn(2, 8, device=device)]
    nested = torch.nested.as_nested_tensor(seqs)
    y, _ = attn(nested, nested, nested)
    assert y.is_nested
    for seq, out in zip(seqs, y.unbind()):
        close(out, attn(seq[None], seq[None], seq[None])[0][0])
