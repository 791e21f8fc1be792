"""Fuzzed inputs (issue 28, part 3), the modules: every public nn.Module entry point, on
shapes (zero-size dimensions included), dtypes, memory layouts (non-contiguous, expanded,
permuted, offset), masks, states and devices (CPU, Meta) drawn by hypothesis. The operators
are fuzzed in test_fuzz_ops.py (where the findings not fixed yet are written down); the
strategies, the module references (written out from the definition, sharing no code with
aaren.modules), the settings and the property every call is held to (a clear error naming
an offending argument, or the float64 reference's result within tolerance.py's rule; Meta
as the CPU; inputs never modified) are fuzz_strategies.py's, as is AAREN_FUZZ_SCALE.

Covered: `Aaren` forward (key_padding_mask, attn_mask, unbatched, both layouts), `prefill`, `step`;
`AarenEncoderLayer` and `AarenEncoder` forward, `prefill`, `step` (streams mixing both).
(`AarenEncoder.compile_step` is `step` under torch.compile: test_step_fast.py covers it.)
"""
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import aaren
from aaren import Aaren, AarenEncoder, AarenEncoderLayer
from fuzz_strategies import (F64, FLOATS, FUZZ_MARKS, arrange, assert_clear_error, assert_matches,
                             assert_unchanged, draw_causal_mask, draw_not_causal_mask,
                             draw_padding_mask, draw_stream_plan, fuzz, grown, plain_attention,
                             plain_encoder, plain_layer, size, snapshot, step_safe_padding,
                             stream_through, to_meta)

pytestmark = FUZZ_MARKS


# ---------------------------------------------------------------- modules: Aaren


@fuzz(50)
@given(data=st.data())
def test_fuzz_aaren_forward(data):
    """Aaren.forward on drawn sizes, dtypes, layouts (batch_first or not, unbatched,
    non-contiguous or expanded input), key_padding_mask (bool/float, fully masked rows)
    and causal attn_masks matches the definition; bad masks and shapes raise naming them.
    An input in another dtype than the module or a key_padding_mask on another device is
    refused by name; on the Meta device (masks included) the shapes are the CPU's."""
    H = data.draw(st.integers(1, 3), label="H")
    d = data.draw(st.integers(1, 4), label="head dim")
    E = H * d
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    batch_first = data.draw(st.booleans(), label="batch_first")
    bias = data.draw(st.booleans(), label="bias")
    training = data.draw(st.booleans(), label="training")
    grad = data.draw(st.booleans(), label="grad")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="init seed"))
    attn = Aaren(E, H, bias=bias, batch_first=batch_first, dtype=dtype).train(training)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B = size(data, "B", 3)
    N = size(data, "N", 10)
    unbatched = data.draw(st.booleans(), label="unbatched") if B == 1 else False
    x = arrange(data, torch.randn(B, N, E, generator=g, dtype=F64).to(dtype), keep_last=False, label="x")
    kpm = draw_padding_mask(data, B, N, g)
    mask = draw_causal_mask(data, N, B * H)
    layout_x = x if batch_first else x.transpose(0, 1)
    layout_kpm = kpm
    if unbatched:
        layout_x = x[0]
        layout_kpm = None if kpm is None else kpm[0]
    defect = data.draw(st.sampled_from([None, None, "attn_mask", "kpm shape", "kpm dtype",
                                        "kpm device", "input dtype", "key shape", "width",
                                        "rank", "meta"]), label="defect")
    key = value = layout_x
    if defect == "meta":  # a module on Meta (shape inference): any valid mask accepted
        meta = Aaren(E, H, bias=bias, batch_first=batch_first, device="meta", dtype=dtype)
        y, _ = meta(to_meta(layout_x), to_meta(key), to_meta(value),
                    key_padding_mask=to_meta(layout_kpm), attn_mask=to_meta(mask))
        assert y.shape == layout_x.shape and y.dtype == dtype and y.device.type == "meta"
        return
    if defect == "kpm device":
        if layout_kpm is None:
            return
        layout_kpm = to_meta(layout_kpm)
        wanted = {"key_padding_mask"}
    elif defect == "input dtype":
        other = data.draw(st.sampled_from([t for t in FLOATS if t != dtype]), label="input dtype")
        layout_x = key = value = layout_x.to(other)
        wanted = {"query", "key", "value", "dtype of"}
    elif defect == "attn_mask":
        mask = draw_not_causal_mask(data, N, B * H)
        wanted = {"attn_mask"}
    elif defect == "kpm shape":
        layout_kpm = torch.zeros(*layout_x.shape[:-1], 2, dtype=torch.bool) if layout_x.dim() else None
        wanted = {"key_padding_mask"}
    elif defect == "kpm dtype":
        layout_kpm = torch.zeros(B, N, dtype=torch.int64)[0 if unbatched else slice(None)]
        wanted = {"key_padding_mask"}
    elif defect == "key shape":
        key = value = grown(layout_x, 0)
        wanted = {"query", "key", "value"}
    elif defect == "width":
        layout_x = key = value = grown(layout_x, -1)
        wanted = {"embed_dim"}
    elif defect == "rank":
        layout_x = key = value = layout_x.unsqueeze(0).unsqueeze(0)
        wanted = {"query"}
    else:
        wanted = None

    def call():
        with torch.set_grad_enabled(grad):
            return attn(layout_x, key, value, key_padding_mask=layout_kpm, attn_mask=mask,
                        need_weights=data.draw(st.booleans(), label="need_weights"),
                        is_causal=mask is not None and data.draw(st.booleans(), label="is_causal"))
    if wanted:
        assert_clear_error(call, wanted, f"Aaren.forward {defect}")
        return
    before = snapshot([x, kpm, mask])
    y, weights = call()
    assert weights is None and y.dtype == dtype and y.shape == layout_x.shape
    y_bf = y.unsqueeze(0) if unbatched else (y if batch_first else y.transpose(0, 1))
    ref = plain_attention(attn, x, kpm, F64)
    base = plain_attention(attn, x, kpm, dtype)
    assert_matches(y_bf, ref, base, "Aaren.forward")
    assert_unchanged([x, kpm, mask], before, "Aaren.forward")
    if grad and dtype == F64 and y.numel() > 0:
        # gradients of the parameters and the input: those of the float64 definition
        leaf = x.detach().clone().requires_grad_()
        lx = leaf if batch_first else leaf.transpose(0, 1)
        lx = lx[0] if unbatched else lx
        w = torch.randn(y.shape, generator=g, dtype=F64)
        params = [p for p in attn.parameters()]
        got = torch.autograd.grad((attn(lx, lx, lx, key_padding_mask=layout_kpm)[0] * w).sum(),
                                  [leaf] + params, allow_unused=True)
        w_bf = w.unsqueeze(0) if unbatched else (w if batch_first else w.transpose(0, 1))
        want = torch.autograd.grad((plain_attention(attn, leaf, kpm, F64) * w_bf).sum(),
                                   [leaf] + params, allow_unused=True)
        for a, b in zip(got, want):
            a = torch.zeros(()) if a is None else a
            b = torch.zeros(()) if b is None else b
            torch.testing.assert_close(a.double().expand_as(b) if a.dim() == 0 else a.double(),
                                       b.double().expand_as(a) if b.dim() == 0 else b.double(),
                                       rtol=1e-8, atol=1e-9)


@fuzz(50)
@given(data=st.data())
def test_fuzz_aaren_streaming(data):
    """Aaren.prefill and Aaren.step in any mix (empty chunks, padding masks in the chunks,
    eval or train mode, autograd on or off, so the cached and uncached step paths both run)
    give the definition over the whole sequence; a bad state or token raises naming it;
    a module on the Meta device gives the same shapes."""
    H = data.draw(st.integers(1, 3), label="H")
    d = data.draw(st.integers(1, 4), label="head dim")
    E = H * d
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    batch_first = data.draw(st.booleans(), label="batch_first")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="init seed"))
    attn = Aaren(E, H, bias=data.draw(st.booleans(), label="bias"), batch_first=batch_first,
                 dtype=dtype).train(data.draw(st.booleans(), label="training"))
    grad = data.draw(st.booleans(), label="grad")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B = size(data, "B", 3)
    N = size(data, "N", 10)
    x = arrange(data, torch.randn(B, N, E, generator=g, dtype=F64).to(dtype), keep_last=False, label="x")
    plan = draw_stream_plan(data, N)
    kpm = step_safe_padding(draw_padding_mask(data, B, N, g), plan)
    defect = data.draw(st.sampled_from([None, None, None, "state batch", "state heads",
                                        "state not a pair", "state dtype", "token shape",
                                        "token not a tensor", "meta"]), label="defect")
    if defect == "meta":
        meta = Aaren(E, H, batch_first=batch_first, device="meta", dtype=dtype)
        chunk = to_meta(x if batch_first else x.transpose(0, 1))
        y, state = meta.prefill(chunk, None, None if kpm is None else to_meta(kpm))
        assert y.shape == chunk.shape and y.device.type == "meta"
        assert state[0].shape == (B, H) and state[1].shape == (B, H, d)
        y, state = meta.step(to_meta(x[:, 0]) if N else torch.empty(B, E, device="meta", dtype=dtype), state)
        assert y.shape == (B, E) and state[0].dtype == state[1].dtype == F64
        return
    if defect is not None:
        good_lse, good_out = aaren.empty_state(B, H, d, dtype)
        token = x[:, 0] if N else torch.zeros(B, E, dtype=dtype)
        state, wanted = (good_lse, good_out), {"state"}
        if defect == "state batch":
            state = (grown(good_lse, 0), grown(good_out, 0))
            wanted = {"state lse", "state out"}
        elif defect == "state heads":
            state = (good_lse, grown(good_out, data.draw(st.sampled_from([1, 2]), label="dim")))
            wanted = {"state out"}
        elif defect == "state not a pair":
            state = data.draw(st.sampled_from(["tensor", "triple", "single"]), label="how")
            state = {"tensor": good_lse, "triple": (good_lse, good_out, good_out),
                     "single": [good_lse]}[state]
        elif defect == "state dtype":
            state = (good_lse.to(torch.int64), good_out)
            wanted = {"state lse"}
        elif defect == "token not a tensor":
            token, wanted = token.tolist(), {"x"}
        else:
            token = torch.zeros(B, E + 1, dtype=dtype) if data.draw(st.booleans()) else \
                torch.zeros(B, 2, E, dtype=dtype)
            wanted = {"x"}
        how = data.draw(st.sampled_from(["step", "prefill"]), label="entry")
        if how == "step":
            call = lambda: attn.step(token, state)  # noqa: E731
        elif defect == "token not a tensor":
            call = lambda: attn.prefill(token, state)  # noqa: E731
        else:
            chunk = token.unsqueeze(1) if token.dim() == 2 else token
            if defect == "token shape":
                chunk = torch.zeros(B, 1, E + 1, dtype=dtype) if token.dim() == 2 else token.unsqueeze(0)
            call = lambda: attn.prefill(chunk if batch_first else chunk.transpose(0, 1), state)  # noqa: E731
        with torch.set_grad_enabled(grad):
            assert_clear_error(call, wanted, f"Aaren.{how} {defect}")
        return
    y, state = stream_through(attn, x, plan, kpm, batch_first, None, grad)
    ref = plain_attention(attn, x, kpm, F64)
    base = plain_attention(attn, x, kpm, dtype)
    assert_matches(y, ref, base, f"Aaren stream {[how for _, _, how in plan]}")
    assert state[0].shape == (B, H) and state[1].shape == (B, H, d)
    assert state[0].dtype == state[1].dtype == F64


# ---------------------------------------------------------------- modules: encoder layers


@fuzz(30)
@given(data=st.data())
def test_fuzz_encoder(data):
    """AarenEncoderLayer and AarenEncoder (0 to 2 layers, norm_first or not, final norm or
    not, relu or gelu): forward with padding and causal masks, and any mix of prefill and
    step, match the definition; a wrong number of states or a bad mask raises naming it."""
    H = data.draw(st.integers(1, 2), label="H")
    E = H * data.draw(st.integers(1, 4), label="head dim")
    dtype = data.draw(st.sampled_from([F64, torch.float32, torch.bfloat16]), label="dtype")
    batch_first = data.draw(st.booleans(), label="batch_first")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="init seed"))
    layer = AarenEncoderLayer(E, H, dim_feedforward=data.draw(st.integers(1, 12), label="ff"),
                              dropout=0.0, activation=data.draw(st.sampled_from(["relu", "gelu"])),
                              batch_first=batch_first,
                              norm_first=data.draw(st.booleans(), label="norm_first"),
                              bias=data.draw(st.booleans(), label="bias"), dtype=dtype)
    with torch.no_grad():  # LayerNorm weights away from 1 and 0 so that they matter
        for p in layer.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, dtype=F64).to(dtype))
    kind = data.draw(st.sampled_from(["layer", "encoder"]), label="module")
    if kind == "layer":
        module = layer
    else:
        norm = nn.LayerNorm(E, dtype=dtype) if data.draw(st.booleans(), label="norm") else None
        module = AarenEncoder(layer, data.draw(st.integers(0, 2), label="layers"), norm=norm)
    module.train(data.draw(st.booleans(), label="training"))
    grad = data.draw(st.booleans(), label="grad")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    B = size(data, "B", 2)
    N = size(data, "N", 8)
    x = arrange(data, torch.randn(B, N, E, generator=g, dtype=F64).to(dtype), keep_last=False, label="x")
    plan = draw_stream_plan(data, N)
    kpm = step_safe_padding(draw_padding_mask(data, B, N, g), plan)

    def reference(dt):
        if kind == "layer":
            return plain_layer(module, x, kpm, dt)
        return plain_encoder(module, x, kpm, dt)
    layout = (lambda t: t) if batch_first else (lambda t: t.transpose(0, 1))
    entry = data.draw(st.sampled_from(["forward", "stream", "bad states", "bad mask"]), label="entry")
    with torch.set_grad_enabled(grad):
        if entry == "bad states":
            if kind == "layer":
                call = lambda: module.step(x[:, 0] if N else torch.zeros(B, E, dtype=dtype),  # noqa: E731
                                           (torch.zeros(B, H), torch.zeros(B, H, E // H), torch.zeros(1)))
                wanted = {"state"}
            else:
                states = [aaren.empty_state(B, H, E // H, dtype)] * (module.num_layers + 1)
                how = data.draw(st.sampled_from(["step", "prefill"]), label="how")
                call = (lambda: module.step(torch.zeros(B, E, dtype=dtype), states)) if how == "step" else \
                    (lambda: module.prefill(layout(x), states))
                wanted = {"states"}
            assert_clear_error(call, wanted, f"{kind} {entry}")
            return
        if entry == "bad mask":
            if kind == "encoder" and module.num_layers == 0:
                return  # no layer looks at the mask
            mask = draw_not_causal_mask(data, N, B * H)
            if kind == "layer":
                call = lambda: module(layout(x), src_mask=mask)  # noqa: E731
            else:
                call = lambda: module(layout(x), mask=mask)  # noqa: E731
            assert_clear_error(call, {"attn_mask"}, f"{kind} {entry}")
            return
        if entry == "forward":
            mask = draw_causal_mask(data, N, B * H)
            if kind == "layer":
                y = layout(module(layout(x), src_mask=mask, src_key_padding_mask=kpm))
            else:
                y = layout(module(layout(x), mask=mask, src_key_padding_mask=kpm))
        else:
            y, states = stream_through(module, x, plan, kpm, batch_first, None, grad)
            if kind == "encoder":
                assert len(states) == module.num_layers
    assert y.dtype == dtype
    assert_matches(y, reference(F64), reference(dtype), f"{kind} {entry}")
