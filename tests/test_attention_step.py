"""torch.ops.aaren.attention_step: the whole attention step of one token (stacked
projection, aaren.step, output projection) as one operator. It must equal the three calls it
stands for, bit for bit, in every dtype; refuse bad shapes with errors that say what was
expected; differentiate, fake-tensor-trace and compile as its parts do; and be what
Aaren.step runs only where that changes nothing (hooks and token dropout keep the modules).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aaren
from aaren.functional import empty_state

B, E, H = 3, 12, 3
D = E // H


def make_inputs(dtype=torch.float32, bias=True, state=True, e_out=E, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    x = randn(B, E)
    proj_weight, out_weight = randn(H + E, E), randn(e_out, E)
    proj_bias = randn(H + E) if bias else None
    out_bias = randn(e_out) if bias else None
    lse = out = None
    if state:
        lse, out = randn(B, H, dtype=torch.float64), randn(B, H, D, dtype=torch.float64)
    return x, proj_weight, proj_bias, out_weight, out_bias, lse, out


def unfused(x, proj_weight, proj_bias, out_weight, out_bias, lse, out):
    projected = F.linear(x, proj_weight, proj_bias)
    state = None if lse is None else (lse, out)
    o, (new_lse, new_out) = aaren.step(projected[:, :H], projected[:, H:].view(B, H, D), state)
    return F.linear(o.flatten(1), out_weight, out_bias), new_lse, new_out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("state", [True, False])
def test_equals_the_three_calls_it_stands_for(dtype, bias, state):
    x, pw, pb, ow, ob, lse, out = make_inputs(dtype, bias, state, e_out=5)
    got = torch.ops.aaren.attention_step(x, pw, pb, ow, ob, H, lse, out)
    want = unfused(x, pw, pb, ow, ob, lse, out)
    assert got[0].dtype == dtype and got[0].shape == (B, 5)
    assert got[1].dtype == got[2].dtype == torch.float64
    # float32 and float64 run the CPU kernel's own products (their sums in another order
    # than BLAS's: a rounding apart); half types run the three calls themselves (bit for bit).
    tolerance = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, 0.0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("batch", [1, 17])  # 17: past the CPU kernel's row-by-row products (1 << 15 multiply-adds)
def test_equals_the_three_calls_at_every_batch_and_layout(batch):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(E, batch, generator=generator).t()  # not contiguous
    pw = torch.randn(H + E, E, generator=generator)
    ow = torch.randn(E, E, generator=generator)
    for args in ((x, pw, None, ow, None), (x.contiguous(), pw, None, ow.t().contiguous().t(), None)):
        y, lse, out = torch.ops.aaren.attention_step(*args, H, None, None)
        projected = F.linear(args[0], pw)
        o, (want_lse, want_out) = aaren.step(projected[:, :H], projected[:, H:].view(batch, H, D))
        torch.testing.assert_close(y, F.linear(o.flatten(1), args[3]), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse, want_lse, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(out, want_out, rtol=2e-5, atol=2e-5)


def test_a_stream_of_steps_equals_the_scan():
    x, pw, pb, ow, ob, _, _ = make_inputs(torch.float64, state=False)
    xs = torch.randn(6, B, E, dtype=torch.float64)
    lse = out = None
    ys = []
    for token in xs:
        y, lse, out = torch.ops.aaren.attention_step(token, pw, pb, ow, ob, H, lse, out)
        ys.append(y)
    projected = F.linear(xs.transpose(0, 1), pw, pb)  # [B, N, H + E]
    o, _ = aaren.scan(projected[..., :H].contiguous(), projected[..., H:].reshape(B, 6, H, D))
    want = F.linear(o.flatten(2), ow, ob).transpose(0, 1)
    torch.testing.assert_close(torch.stack(ys), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"][None]}, r"x must have shape \[B, E\]"),
    (lambda a: {**a, "num_heads": 0}, "num_heads must be positive"),
    (lambda a: {**a, "num_heads": 5}, "must be a multiple of num_heads = 5"),
    (lambda a: {**a, "proj_weight": a["proj_weight"][1:]}, r"proj_weight must have shape \[H \+ E, E\] = \[15, 12\]"),
    (lambda a: {**a, "out_weight": a["out_weight"][:, 1:]}, r"out_weight must have shape \[E_out, E\] with E = 12"),
    (lambda a: {**a, "proj_bias": a["proj_bias"][:E]}, r"proj_bias must have shape \[15\], got shape \[12\]"),
    (lambda a: {**a, "proj_bias": a["proj_bias"][None]}, r"proj_bias must have shape \[15\]"),
    (lambda a: {**a, "out_bias": a["out_bias"][1:]}, r"out_bias must have shape \[12\]"),
    (lambda a: {**a, "proj_weight": a["proj_weight"].double()}, r"proj_weight must have the dtype of x \(Float\), got Double"),
    (lambda a: {**a, "out_bias": a["out_bias"].double()}, r"out_bias must have the dtype of x"),
    (lambda a: {**a, "state_lse": a["state_lse"][:, :1]},
     "aaren.attention_step: state lse's head dimension has 1 where num_heads has 3"),
    (lambda a: {**a, "state_out": a["state_out"][:2]},
     "aaren.attention_step: state out's batch dimension has 2 where x has 3"),
    (lambda a: {**a, "state_out": a["state_out"][..., :1]},
     "aaren.attention_step: state out's last dimension has 1 where E / num_heads has 4"),
    (lambda a: {**a, "state_out": None}, "the state needs both lse and out, or neither"),
])
def test_bad_input_is_refused_with_a_clear_error(change, message):
    x, pw, pb, ow, ob, lse, out = make_inputs()
    args = dict(x=x, proj_weight=pw, proj_bias=pb, out_weight=ow, out_bias=ob, num_heads=H,
                state_lse=lse, state_out=out)
    args = change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aaren.attention_step(*args.values())


@pytest.mark.parametrize("name", ["x", "proj_weight", "proj_bias", "out_weight", "out_bias"])
def test_an_argument_on_another_device_is_refused_by_name(name):
    """Found by fuzzing: the CPU kernel read weights on another device as host memory."""
    x, pw, pb, ow, ob, lse, out = make_inputs()
    args = dict(x=x, proj_weight=pw, proj_bias=pb, out_weight=ow, out_bias=ob, num_heads=H,
                state_lse=lse, state_out=out)
    args[name] = args[name].to("meta")
    message = "proj_weight must be on the device of x" if name == "x" else \
        f"{name} must be on the device of x \\(cpu\\), got meta"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.aaren.attention_step(*args.values())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_x_in_a_dtype_the_scan_does_not_take_is_named(dtype):
    """With the weights in that dtype too, the error names x (not the scan's values)."""
    x, pw, pb, ow, ob, _, _ = make_inputs(state=False)
    args = [t.to(dtype) for t in (x, pw, pb, ow, ob)]
    with pytest.raises(TypeError, match="aaren.attention_step: x must be float64, float32, "
                                        "bfloat16 or float16"):
        torch.ops.aaren.attention_step(*args, H, None, None)


def test_gradients_are_those_of_its_parts():
    inputs = [t.requires_grad_() for t in make_inputs(torch.float64)]
    x, pw, pb, ow, ob, lse, out = inputs
    assert torch.autograd.gradcheck(
        lambda *a: torch.ops.aaren.attention_step(*a[:5], H, *a[5:]), inputs)
    y, new_lse, new_out = torch.ops.aaren.attention_step(x, pw, pb, ow, ob, H, lse, out)
    loss = y.square().sum() + new_lse.sum() + new_out.sum()
    got = torch.autograd.grad(loss, inputs)
    y, new_lse, new_out = unfused(*inputs)
    want = torch.autograd.grad(y.square().sum() + new_lse.sum() + new_out.sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_opcheck():
    x, pw, pb, ow, ob, lse, out = make_inputs()
    torch.library.opcheck(torch.ops.aaren.attention_step.default,
                          (x, pw.requires_grad_(), pb, ow, ob, H, lse, out))
    torch.library.opcheck(torch.ops.aaren.attention_step.default, (x, pw, None, ow, None, H, None, None))


def test_compiles_without_graph_breaks():
    x, pw, pb, ow, ob, lse, out = make_inputs()
    compiled = torch.compile(lambda *a: torch.ops.aaren.attention_step(*a[:5], H, *a[5:]),
                             fullgraph=True, backend="aot_eager")
    for g, w in zip(compiled(x, pw, pb, ow, ob, lse, out),
                    torch.ops.aaren.attention_step(x, pw, pb, ow, ob, H, lse, out)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def make_attention(dropout=0.0):
    attention = aaren.Aaren(E, H, dropout=dropout).eval()
    with torch.no_grad():
        for linear in (attention.k_proj, attention.v_proj, attention.out_proj):
            linear.bias.normal_()
    return attention


def test_aaren_step_is_the_operator_and_scripts():
    attention = make_attention().double()
    x = torch.randn(B, E)
    x = x.double()
    state = empty_state(B, H, D, torch.float64)
    with torch.no_grad():
        weight, bias = attention._step_projection()
        want = torch.ops.aaren.attention_step(x, weight, bias, attention.out_proj.weight,
                                              attention.out_proj.bias, H, *state)
        got_y, got_state = attention.step(x, state)
        scripted = torch.jit.script(attention)
        scripted_y, scripted_state = scripted.step(x, state)
    for got in ((got_y, *got_state), (scripted_y, *scripted_state)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="Aaren.step: state must be a pair"):
        attention.step(x, (state[0],))


def test_aaren_step_calls_hooked_or_replaced_projections():
    """A forward hook on out_proj (or v_proj) must run: step then calls the modules."""
    for name in ("out_proj", "v_proj"):
        attention = make_attention()
        x = torch.randn(B, E)
        with torch.no_grad():
            plain = attention.step(x)[0]
            calls = []
            handle = getattr(attention, name).register_forward_hook(
                lambda module, args, output: calls.append(1) or output + 1)
            hooked = attention.step(x)[0]
            handle.remove()
        assert calls == [1], name
        assert not torch.allclose(hooked, plain), name


def test_training_with_dropout_drops_tokens():
    """Token dropout acts between the products, so it needs the unfused path: with p close to
    1 most tokens' contributions vanish, which the operator alone could not do."""
    attention = make_attention(dropout=0.9).train()
    x = torch.randn(64, E)
    torch.manual_seed(0)
    y, (lse, out) = attention.step(x)
    assert (out == 0).all(dim=-1).float().mean() > 0.5  # dropped tokens leave out = 0
    y_eval, (_, out_eval) = attention.eval().step(x)
    assert not (out_eval == 0).all(dim=-1).any()
