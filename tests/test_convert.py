"""aaren.convert and the from_* constructors: converting nn.MultiheadAttention self-attention
(in nn.Transformer, encoder layers, custom modules, by name) copies the projections and leaves
cross-attention alone, refuses what it cannot convert, keeps each copied parameter's
requires_grad (every subset frozen), and a converted encoder trains, runs in eval, and streams
as an AarenEncoder.
"""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aaren import Aaren, AarenEncoder, AarenEncoderLayer, convert
from module_reference import F64, MODULE_MARKS, close, randn

pytestmark = MODULE_MARKS


# ------------------------------------------------------------------------- convert

def test_convert_copies_projections_and_leaves_cross_attention(device):
    model = nn.Transformer(8, 2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=16,
                           device=device, dtype=F64)
    originals = {name: copy.deepcopy(m) for name, m in model.named_modules()
                 if isinstance(m, nn.MultiheadAttention)}
    model.eval()
    assert convert(model) is model
    assert model.aaren_converted == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn",
                                     "decoder.layers.0.self_attn"]
    assert isinstance(model.decoder.layers[0].multihead_attn, nn.MultiheadAttention)
    assert not model.encoder.use_nested_tensor
    for name in model.aaren_converted:
        attn, mha = model.get_submodule(name), originals[name]
        assert isinstance(attn, Aaren) and not attn.training
        assert (attn.embed_dim, attn.num_heads, attn.batch_first, attn.dropout) == \
            (mha.embed_dim, mha.num_heads, mha.batch_first, mha.dropout)
        assert attn.query.dtype == F64 and attn.query.device.type == device.type
        w, b = mha.in_proj_weight, mha.in_proj_bias
        assert torch.equal(attn.k_proj.weight, w[8:16]) and torch.equal(attn.v_proj.weight, w[16:])
        assert torch.equal(attn.k_proj.bias, b[8:16]) and torch.equal(attn.v_proj.bias, b[16:])
        assert torch.equal(attn.out_proj.weight, mha.out_proj.weight)
        assert torch.equal(attn.out_proj.bias, mha.out_proj.bias)
    src, tgt = randn(6, 2, 8, device=device), randn(4, 2, 8, device=device)
    assert model(src, tgt).shape == (4, 2, 8)
    assert convert(model).aaren_converted == model.aaren_converted  # nothing more to do


def test_convert_names_sharing_and_refusals(device):
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, bias=False, batch_first=True, device=device)
            self.again = self.attn
            self.cross = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, device=device)

    model = Custom()
    convert(model, names=["attn", "again"])
    assert isinstance(model.attn, Aaren) and model.attn is model.again
    assert model.attn.k_proj.bias is None and model.attn.batch_first
    assert model.attn.query.device.type == device.type
    with pytest.raises(ValueError, match="kdim"):
        convert(model, names=["cross"])
    with pytest.raises(ValueError, match="not nn.MultiheadAttention"):
        convert(model, names=["attn"])
    with pytest.raises(ValueError, match="no modules named"):
        convert(model, names=["missing"])
    with pytest.raises(ValueError, match="add_bias_kv"):
        convert(_with_bias_kv())
    single = convert(nn.MultiheadAttention(8, 2))
    assert isinstance(single, Aaren) and single.aaren_converted == [""]


# Which nn.MultiheadAttention parameter each copied Aaren parameter comes from.
_AAREN_SOURCE = {"k_proj.weight": "in_proj_weight", "v_proj.weight": "in_proj_weight",
                 "k_proj.bias": "in_proj_bias", "v_proj.bias": "in_proj_bias",
                 "out_proj.weight": "out_proj.weight", "out_proj.bias": "out_proj.bias"}


def _expected_flags(flags, attentions=("",)):
    """requires_grad of a model's parameters (name -> bool) -> the flags its Aaren version
    must have, `attentions` the prefixes of the nn.MultiheadAttention modules replaced: a
    copied parameter keeps its source's flag; an attention's new query trains unless every
    parameter of the attention it replaces was frozen."""
    want = {name: flag for name, flag in flags.items()
            if not any(name.startswith(prefix) for prefix in attentions)}
    for prefix in attentions:
        attn = {n[len(prefix):]: f for n, f in flags.items() if n.startswith(prefix)}
        for target, source in _AAREN_SOURCE.items():
            if source in attn:
                want[prefix + target] = attn[source]
        want[prefix + "query"] = any(attn.values())
    return want


def _flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _freeze_cases(names):
    """Every subset of `names` to freeze (the rest trainable)."""
    return [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


@pytest.mark.parametrize("bias,frozen", [
    (bias, frozen)
    for bias, names in [(True, ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                "out_proj.bias"]),
                        (False, ["in_proj_weight", "out_proj.weight"])]
    for frozen in _freeze_cases(names)],
    ids=lambda v: v if isinstance(v, bool) else "frozen=" + ("+".join(sorted(v)) or "none"))
def test_convert_keeps_requires_grad_of_each_copied_parameter(device, bias, frozen):
    """Fine-tuning only out_proj (or what a LoRA wrapper leaves trainable) survives
    convert: each copied parameter keeps its own source's flag, not in_proj_weight's."""
    mha = nn.MultiheadAttention(8, 2, bias=bias, device=device)
    for name, p in mha.named_parameters():
        p.requires_grad_(name not in frozen)
    flags = _flags(mha)
    want = _expected_flags(flags)
    assert set(want) == {n for n, _ in Aaren(8, 2, bias=bias).named_parameters()}
    assert want["query"] == (len(frozen) < len(flags))
    assert _flags(Aaren.from_multihead_attention(mha)) == want
    assert _flags(convert(mha)) == want
    layer = nn.TransformerEncoderLayer(8, 2, 16, bias=bias, device=device)
    layer.self_attn = mha
    convert(layer)
    assert _flags(layer.self_attn) == want
    assert _flags(mha) == flags  # the source is left as it was


_ENCODER_FREEZES = {
    "nothing": lambda name: False,
    "everything": lambda name: True,
    "all but out_proj": lambda name: "out_proj" not in name,
    "only self-attention": lambda name: "self_attn" in name,
    "only in_proj_weight": lambda name: name.endswith("in_proj_weight"),
    "feed-forward and norms": lambda name: "linear" in name or "norm" in name,
    "layer 0 only": lambda name: name.startswith("layers.0."),
    "final norm and linear2 weights": lambda name: name.startswith("norm.") or
    name.endswith("linear2.weight"),
}


@pytest.mark.parametrize("freeze", list(_ENCODER_FREEZES))
def test_encoder_copies_keep_requires_grad_of_every_parameter(device, freeze):
    """convert, AarenEncoder.from_transformer_encoder and
    AarenEncoderLayer.from_transformer_encoder_layer keep the flag of every copied parameter
    (attention, norms, linear1/linear2, final norm), converted first or not."""
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, device=device), 2,
        norm=nn.LayerNorm(8, device=device))
    for name, p in encoder.named_parameters():
        p.requires_grad_(not _ENCODER_FREEZES[freeze](name))
    want = _expected_flags(_flags(encoder), ["layers.0.self_attn.", "layers.1.self_attn."])
    converted = convert(copy.deepcopy(encoder))
    assert _flags(converted) == want
    for source in (encoder, converted):
        assert _flags(AarenEncoder.from_transformer_encoder(source)) == want
        for i, layer in enumerate(source.layers):
            prefix = f"layers.{i}."
            assert _flags(AarenEncoderLayer.from_transformer_encoder_layer(layer)) == \
                {n[len(prefix):]: f for n, f in want.items() if n.startswith(prefix)}


def _with_bias_kv():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    layer.self_attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    return layer


def _majority_task(batch, n, vocab=4):
    """Token sequences; the label at t is the most frequent token among 0..t (ties: smallest)."""
    tokens = torch.randint(vocab, (batch, n))
    counts = F.one_hot(tokens, vocab).cumsum(1)
    return tokens, counts.argmax(-1)


def test_converted_encoder_trains_and_runs_in_eval(device):
    torch.manual_seed(0)
    vocab, d = 4, 16
    encoder = convert(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True, device=device), 2))
    embed, head = nn.Embedding(vocab, d, device=device), nn.Linear(d, vocab, device=device)
    params = [*encoder.parameters(), *embed.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=5e-3)
    losses = []
    for _ in range(50):
        tokens, labels = (t.to(device) for t in _majority_task(16, 12, vocab))
        loss = F.cross_entropy(head(encoder(embed(tokens))).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    encoder.eval()
    tokens, labels = (t.to(device) for t in _majority_task(64, 12, vocab))
    mask = torch.zeros(64, 12, dtype=torch.bool, device=device)
    mask[:, 9:] = True
    with torch.no_grad():
        logits = head(encoder(embed(tokens)))
        padded = head(encoder(embed(tokens), src_key_padding_mask=mask))
    assert (logits.argmax(-1) == labels).float().mean() > 0.7
    close(padded[:, :9], logits[:, :9], atol=1e-5, rtol=1e-5)  # causal: padding after is unseen
    # the trained nn.TransformerEncoder streams as an AarenEncoder
    stream = AarenEncoder.from_transformer_encoder(encoder)
    states, outs = None, []
    with torch.no_grad():
        for t in range(12):
            out, states = stream.step(embed(tokens[:, t]), states)
            outs.append(out)
        close(torch.stack(outs, 1), encoder(embed(tokens)), atol=1e-5, rtol=1e-5)
