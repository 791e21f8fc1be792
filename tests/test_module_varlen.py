"""Packed sequences of different lengths in the layers: Aaren.forward(x [T, E], cu_seqlens=...),
AarenEncoderLayer / AarenEncoder with cu_seqlens, nested tensors (jagged and strided) without
padding, and converted models (nn.TransformerEncoder after aaren.convert) fed a jagged nested
tensor; each against the same module run on every sequence alone; gradients, TorchScript,
and the errors."""
import warnings

import pytest
import torch
from torch import nn

import aaren

E, HEADS = 16, 4
LENGTHS = [5, 0, 1, 12, 3]


def packed_input(lengths=LENGTHS, dtype=torch.float64):
    x = torch.randn(sum(lengths), E, dtype=dtype)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return x, cu


def each_sequence(fn, x, lengths):
    """fn over every sequence alone (unbatched [n, E]), concatenated."""
    pieces = x.split(lengths)
    return torch.cat([fn(piece) if piece.size(0) else piece for piece in pieces])


@pytest.mark.parametrize("batch_first", [False, True])
def test_aaren_packed_equals_each_sequence(batch_first):
    module = aaren.Aaren(E, HEADS, batch_first=batch_first, dtype=torch.float64)
    x, cu = packed_input()
    y, weights = module(x, x, x, cu_seqlens=cu, max_seqlen=max(LENGTHS))
    assert weights is None and y.shape == x.shape
    want = each_sequence(lambda p: module(p, p, p)[0], x, LENGTHS)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_aaren_packed_key_padding_mask():
    module = aaren.Aaren(E, HEADS, dtype=torch.float64)
    x, cu = packed_input()
    mask = torch.rand(x.size(0)) < 0.3
    y, _ = module(x, x, x, key_padding_mask=mask, cu_seqlens=cu)
    pieces, masks = x.split(LENGTHS), mask.split(LENGTHS)
    want = torch.cat([module(p, p, p, key_padding_mask=m)[0] if p.size(0) else p
                      for p, m in zip(pieces, masks)])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_aaren_packed_gradients_equal_each_sequence():
    module = aaren.Aaren(E, HEADS, dtype=torch.float64)
    x, cu = packed_input()
    grad = torch.randn_like(x)
    module(x, x, x, cu_seqlens=cu)[0].backward(grad)
    packed_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    each_sequence(lambda p: module(p, p, p)[0], x, LENGTHS).backward(grad)
    for got, p in zip(packed_grads, module.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", [torch.jagged, torch.strided])
def test_aaren_nested_input_without_padding(layout):
    module = aaren.Aaren(E, HEADS, batch_first=True, dtype=torch.float64)
    x, _ = packed_input([5, 1, 12, 3])
    pieces = list(x.split([5, 1, 12, 3]))
    nested = torch.nested.nested_tensor(pieces, layout=layout)
    y, _ = module(nested, nested, nested)
    assert y.is_nested and y.layout == layout
    for got, piece in zip(y.unbind(), pieces):
        torch.testing.assert_close(got, module(piece, piece, piece)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_packed_equals_each_sequence(norm_first):
    layer = aaren.AarenEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0,
                                    norm_first=norm_first, dtype=torch.float64)
    encoder = aaren.AarenEncoder(layer, num_layers=2, norm=nn.LayerNorm(E, dtype=torch.float64))
    x, cu = packed_input()
    y = encoder(x, cu_seqlens=cu, max_seqlen=max(LENGTHS))
    want = each_sequence(lambda p: encoder(p.unsqueeze(1)).squeeze(1), x, LENGTHS)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


def test_converted_transformer_takes_a_jagged_nested_tensor():
    """A model built on nn.TransformerEncoder, converted, runs packed sequences given as a
    jagged nested tensor: every Aaren takes its values and offsets (no padding)."""
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       dtype=torch.float64)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    aaren.convert(model)
    x, _ = packed_input([5, 1, 12, 3])
    pieces = list(x.split([5, 1, 12, 3]))
    nested = torch.nested.nested_tensor(pieces, layout=torch.jagged)
    y = model(nested)
    for got, piece in zip(y.unbind(), pieces):
        torch.testing.assert_close(got, model(piece.unsqueeze(0))[0], rtol=1e-10, atol=1e-12)


def test_torchscript_encoder_with_cu_seqlens(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        layer = aaren.AarenEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0, dtype=torch.float64)
        encoder = aaren.AarenEncoder(layer, num_layers=2).eval()
        scripted = torch.jit.script(encoder)
        path = tmp_path / "encoder.pt"
        scripted.save(str(path))
        loaded = torch.jit.load(str(path))
        x, cu = packed_input()
        torch.testing.assert_close(loaded(x, cu_seqlens=cu), encoder(x, cu_seqlens=cu))


def test_packed_errors():
    module = aaren.Aaren(E, HEADS)
    x, cu = packed_input(dtype=torch.float32)
    with pytest.raises(ValueError, match="with cu_seqlens, query, key and value must be packed"):
        module(x[None], x[None], x[None], cu_seqlens=cu)
    with pytest.raises(ValueError, match="with cu_seqlens, attn_mask must be None"):
        module(x, x, x, cu_seqlens=cu, attn_mask=torch.zeros(x.size(0), x.size(0)))
    with pytest.raises(ValueError, match="key_padding_mask must have shape \\[T\\]"):
        module(x, x, x, cu_seqlens=cu, key_padding_mask=torch.zeros(1, x.size(0), dtype=torch.bool))
    with pytest.raises(RuntimeError, match="cu_seqlens must end at the number of tokens"):
        module(x[:-1], x[:-1], x[:-1], cu_seqlens=cu)


def test_compile_encoder_with_cu_seqlens():
    torch._dynamo.reset()
    layer = aaren.AarenEncoderLayer(E, HEADS, dim_feedforward=32, dropout=0.0)
    encoder = aaren.AarenEncoder(layer, num_layers=2)
    compiled = torch.compile(encoder, fullgraph=True)
    for lengths in ([5, 0, 1, 12, 3], [7, 7, 2]):
        x, cu = packed_input(lengths, dtype=torch.float32)
        torch.testing.assert_close(compiled(x, cu_seqlens=cu, max_seqlen=12),
                                   encoder(x, cu_seqlens=cu, max_seqlen=12))
