"""AarenEncoderLayer and AarenEncoder: the layer computes what nn.TransformerEncoderLayer with
Aaren as its self-attention computes (every activation, norm first or last) and matches the
float64 reference, the encoder's forward, prefill and step agree, every parameter gets a
gradient in every mode, and the encoder trains under single-process DDP with
find_unused_parameters=False.
"""
import pytest
import torch
from torch import nn

from aaren import AarenEncoder, AarenEncoderLayer, convert
from module_reference import F64, MODULE_MARKS, close, randn, reference_encoder_layer

pytestmark = MODULE_MARKS


# ------------------------------------------------------------------------- stacked models

@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", nn.SiLU()])
def test_encoder_layer_matches_torch_layer_with_aaren(device, norm_first, activation):
    kw = dict(dim_feedforward=16, dropout=0.0, activation=activation, batch_first=True,
              norm_first=norm_first, device=device, dtype=F64)
    ours = AarenEncoderLayer(8, 2, **kw)
    theirs = convert(nn.TransformerEncoderLayer(8, 2, **kw))
    theirs.load_state_dict(ours.state_dict())  # same parameter names
    x = randn(2, 6, 8, device=device)
    mask = torch.zeros(2, 6, dtype=torch.bool, device=device)
    mask[1, 1] = True
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        close(ours(x, src_key_padding_mask=mask), theirs(x, src_key_padding_mask=mask))
    close(ours(x, src_key_padding_mask=mask), reference_encoder_layer(ours, x, mask))


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_forward_prefill_step_agree(device, batch_first):
    layer = AarenEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=True,
                              device=device, dtype=F64)
    enc = AarenEncoder(layer, 3, norm=nn.LayerNorm(8, device=device, dtype=F64))
    for layer in enc.layers:  # distinct layers
        layer.self_attn.reset_parameters()
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    x = randn(2, 7, 8, device=device)
    y = layout(enc(layout(x)))
    expected = x
    for layer in enc.layers:
        expected = reference_encoder_layer(layer, layout(expected))
        expected = layout(expected)
    close(y, enc.norm(expected))
    states, outs = None, []
    for t in range(7):
        out, states = enc.step(x[:, t], states)
        outs.append(out)
    assert len(states) == 3
    close(torch.stack(outs, 1), y)
    first, states = enc.prefill(layout(x[:, :3]))
    second, _ = enc.prefill(layout(x[:, 3:]), states)
    close(torch.cat([layout(first), layout(second)], 1), y)
    causal = torch.ones(7, 7, dtype=torch.bool, device=device).triu(1)
    close(layout(enc(layout(x), mask=causal, is_causal=True)), y)
    with pytest.raises(ValueError, match="states"):
        enc.step(x[:, 0], states[:2])
    with pytest.raises(TypeError):
        AarenEncoder(nn.TransformerEncoderLayer(8, 2), 2)


# ------------------------------------------------------------------------- training

def test_every_parameter_gets_a_gradient(device):
    """No unused parameters (DDP with find_unused_parameters=False), in every mode."""
    model = AarenEncoder(AarenEncoderLayer(8, 2, 16, batch_first=True, device=device), 2)
    x = torch.randn(2, 5, 8, device=device)
    with torch.no_grad():
        _, states = model.prefill(x[:, :3])  # (from the empty state, one token's output is
    # its value whatever its score: the query would get an exact zero gradient)
    for run in (lambda: model(x), lambda: model.prefill(x)[0], lambda: model.step(x[:, 3], states)[0]):
        model.zero_grad(set_to_none=True)
        run().square().sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            if not name.endswith("k_proj.bias"):  # a key bias shifts all scores alike
                assert p.grad.abs().max() > 0, name


def test_ddp_single_process(tmp_path, device):
    import torch.distributed as dist
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or not dist.is_backend_available(backend):
        pytest.skip(f"no {backend}")
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(
            AarenEncoder(AarenEncoderLayer(8, 2, 16, batch_first=True, device=device), 2),
            device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
            find_unused_parameters=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):  # an unused parameter makes the second iteration fail
            opt.zero_grad()
            model(torch.randn(2, 5, 8, device=device)).square().mean().backward()
            opt.step()
    finally:
        dist.destroy_process_group()
