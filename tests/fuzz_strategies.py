"""Strategies, settings and judging shared by the fuzz tests (issue 28, part 3):
test_fuzz_ops.py fuzzes the operators, test_fuzz_modules.py the nn.Modules. Not a test
module: it holds no tests.

The property is the same everywhere: a call either raises a clear error (a ValueError,
TypeError or RuntimeError whose message names an offending argument) or returns what the
float64 reference gives, within tolerance.py's rule (float64: a fixed relative bound, as in
the other property tests). On the Meta device a call must fail or succeed exactly as on the
CPU, with outputs of the same shapes and dtypes. Inputs are never modified.

Each valid input is judged by an independent reference (naive.py's masked softmax over
every prefix, and module projections written out here); each defect drawn (a wrong rank,
size, dtype, device or layout, a half or malformed state, a non-tensor) knows which
arguments it makes wrong, and the error's message must name one of them.

Here: the settings (`fuzz`, and `FUZZ_MARKS`: the test modules' warning filters and one
torch thread), the judging (`assert_matches`, `assert_clear_error`, Meta and no-modification
checks), the memory layouts, the scan problems with their references and defects, and the
module references with the masks and streams the module tests draw. The helpers of a single
test stay next to it in its file (the gradient rule of the backward, attention_step's
problems, the _into defects).

Determinism: derandomize=True and no example database, so CI runs the same examples every
time. AAREN_FUZZ_SCALE=10 multiplies every test's number of examples (a longer local hunt).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from naive import naive_scan
from tolerance import EPS, assert_close_to_reference, error_against

F64 = torch.float64
FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
BAD_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
INF = float("inf")
CLEAR_ERRORS = (ValueError, TypeError, RuntimeError)
SCALE = float(os.environ.get("AAREN_FUZZ_SCALE", "1"))


def fuzz(examples):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


# Both fuzz modules' marks (`pytestmark = FUZZ_MARKS`): the warnings their defects provoke, and
# conftest.py's one_thread (tiny problems: intra-op threads would only add synchronization on
# a busy machine).
FUZZ_MARKS = [
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:Casting complex values to real:UserWarning"),  # dtype defects
    pytest.mark.usefixtures("one_thread"),
]


# ---------------------------------------------------------------- judging


def assert_matches(got, ref64, baseline, what):
    """tolerance.py's rule; float64 (no coarser plain-PyTorch baseline) to 1e-10 relative."""
    assert got.shape == ref64.shape, (what, tuple(got.shape), tuple(ref64.shape))
    event(f"{what.split(' ')[0]}: checked against the reference, {baseline.dtype}"
          f"{', empty' if got.numel() == 0 else ''}")
    if baseline.dtype == F64:
        error, magnitude = error_against(got, ref64)
        # (a result held in a narrower type, as the gradient of a float32 state, is rounded)
        rounding = 0.0 if got.dtype == F64 else EPS[got.dtype] * magnitude
        assert error <= 1e-10 * max(1.0, magnitude) + rounding, f"{what}: error {error:.3e} (float64)"
    else:
        assert_close_to_reference(got, ref64, baseline, what=what)


def assert_clear_error(call, names, what=""):
    """`call()` raises ValueError, TypeError or RuntimeError naming one of `names`."""
    try:
        call()
    except CLEAR_ERRORS as error:
        message = str(error)
        event(f"{what.split(' ')[0]}: raised {type(error).__name__}")
        assert any(name in message for name in names), \
            f"{what}: the error does not name any of {sorted(names)}: {message[:400]}"
        return error
    except Exception as error:  # noqa: BLE001  (the wrong kind of error is the finding)
        raise AssertionError(f"{what}: {type(error).__name__} is not a clear error "
                             f"(wanted one naming {sorted(names)}): {error}") from error
    raise AssertionError(f"{what}: no error, but {sorted(names)} are wrong")


def tensors_in(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in tensors_in(item)]
    return []


def to_meta(t):
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def like_on_cpu(t):
    """A CPU tensor of `t`'s shape, strides and dtype, zeros (for a Meta tensor: its twin)."""
    if not isinstance(t, torch.Tensor):
        return t
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) \
        if t.numel() > 0 else 0
    return torch.zeros(extent, dtype=t.dtype).as_strided(t.shape, t.stride())


def assert_same_metadata(meta_result, cpu_result, what):
    event(f"{what.split(' ')[0]}: Meta metadata compared")
    metas, cpus = tensors_in(meta_result), tensors_in(cpu_result)
    assert len(metas) == len(cpus), what
    for m, c in zip(metas, cpus):
        assert m.device.type == "meta", what
        assert (m.shape, m.dtype) == (c.shape, c.dtype), (what, m.shape, m.dtype, c.shape, c.dtype)


def snapshot(args):
    return [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else a
            for a in args]


def assert_unchanged(args, before, what):
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor) and a.device.type != "meta":
            assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                         and torch.equal(a.nan_to_num(), b.nan_to_num())), \
                f"{what}: an input was modified"


def size(data, label, hi, zero=True):
    """A dimension's size, from 1 to hi, or 0 (with `zero`) in about one draw in eight:
    drawn as integers(0, hi), hypothesis would give 0 in every dimension at once too often."""
    if zero and data.draw(st.integers(0, 7), label=f"{label} = 0") == 7:
        return 0
    return data.draw(st.integers(1, hi), label=label)


def device_of(data):
    return "meta" if data.draw(st.integers(0, 3), label="meta") == 0 else "cpu"


# ---------------------------------------------------------------- layouts

LAYOUTS = ["contiguous", "permuted", "strided", "offset", "expanded"]


def arrange(data, base, keep_last, label):
    """`base` in a memory layout drawn from LAYOUTS: stored in another dimension order,
    every k-th element of a larger buffer (its other elements NaN: a read outside the view
    shows), at an offset into a buffer, or expanded (stride 0) along one dimension (then its
    values repeat along it: the reference reads the same tensor). `keep_last` keeps the last
    dimension contiguous."""
    kind = data.draw(st.sampled_from(LAYOUTS), label=f"{label} layout")
    dims = base.dim()
    if kind == "contiguous" or dims == 0:
        return base.contiguous()
    movable = dims - 1 if keep_last else dims
    if kind == "permuted":
        perm = list(data.draw(st.permutations(range(movable)), label=f"{label} order"))
        perm += list(range(movable, dims))
        inverse = [perm.index(i) for i in range(dims)]
        return base.permute(perm).contiguous().permute(inverse)
    fill = float("nan") if base.is_floating_point() else 0
    if kind == "strided":
        steps = [data.draw(st.integers(1, 3), label=f"{label} step") for _ in range(dims)]
        if keep_last:
            steps[-1] = 1
        buffer = torch.full([s * k for s, k in zip(base.shape, steps)], fill, dtype=base.dtype)
        view = buffer[tuple(slice(None, None, k) for k in steps)]
        return view.copy_(base)
    if kind == "offset":
        offset = data.draw(st.integers(1, 5), label=f"{label} offset")
        buffer = torch.full([base.numel() + offset], fill, dtype=base.dtype)
        return buffer[offset:].view(base.shape).copy_(base)
    # expanded
    candidates = [d for d in range(movable) if base.size(d) > 0]
    if not candidates:
        return base.contiguous()
    d = data.draw(st.sampled_from(candidates), label=f"{label} expanded dim")
    return base.narrow(d, 0, 1).expand(base.shape)


def strided_last(t):
    """`t` with its last dimension at stride 2 (not contiguous when it has 2 or more entries)."""
    buffer = torch.zeros(*t.shape[:-1], 2 * t.size(-1), dtype=t.dtype, device=t.device)
    return buffer[..., ::2].copy_(t)


def grown(t, dim):
    """A tensor like `t` with one more entry in `dim` (zeros: its values do not matter)."""
    shape = list(t.shape)
    shape[dim] += 1
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


# ---------------------------------------------------------------- scan problems

STATE_KINDS = ["none", "float64", "float32", "dtype", "empty", "partly empty", "expanded lse"]


def draw_scan_problem(data, tokens=None, max_tokens=20):
    """A valid (scores [B, N, H], values [B, N, H, D], lse [B, H] or None, out [B, H, D] or
    None) in a drawn dtype and layout, scores at a drawn scale with a drawn masking rate."""
    B = size(data, "B", 3)
    N = tokens if tokens is not None else size(data, "N", max_tokens)
    H = size(data, "H", 3)
    D = size(data, "D", 8)
    dtype = data.draw(st.sampled_from(FLOATS), label="dtype")
    scale = data.draw(st.sampled_from([0.1, 1.0, 30.0, 1e3]), label="scale")
    masked = data.draw(st.sampled_from([0.0, 0.0, 0.3, 0.9, 1.0]), label="masked")
    kind = data.draw(st.sampled_from(STATE_KINDS), label="state")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    scores = scale * torch.randn(B, N, H, generator=g, dtype=F64)
    scores = scores.masked_fill(torch.rand(B, N, H, generator=g, dtype=F64) < masked, -INF)
    values = torch.randn(B, N, H, D, generator=g, dtype=F64)
    lse = out = None
    if kind != "none":
        lse = 5 * torch.randn(B, H, generator=g, dtype=F64)
        out = torch.randn(B, H, D, generator=g, dtype=F64)
        if kind == "empty":
            lse.fill_(-INF)
            out.zero_()
        elif kind == "partly empty":
            empty = torch.rand(B, H, generator=g) < 0.5
            lse.masked_fill_(empty, -INF)
            out.masked_fill_(empty.unsqueeze(-1), 0.0)
        elif kind == "expanded lse":
            lse = lse[:1].expand(B, H) if B > 0 else lse
        state_dtype = {"float32": torch.float32, "dtype": dtype}.get(kind, F64)
        lse, out = lse.to(state_dtype), out.to(state_dtype)
    scores = arrange(data, scores.to(dtype), keep_last=False, label="scores")
    values = arrange(data, values.to(dtype), keep_last=True, label="values")
    if lse is not None and kind != "expanded lse":
        lse = arrange(data, lse, keep_last=False, label="state lse")
    if out is not None:
        out = arrange(data, out, keep_last=False, label="state out")
    return {"scores": scores, "values": values, "lse": lse, "out": out}


def scan_reference(p):
    """(out, per-token lse) in float64 and in the values' dtype (the baseline)."""
    state = None if p["lse"] is None else (p["lse"], p["out"])
    ref = naive_scan(p["scores"], p["values"], state, dtype=F64)
    base = naive_scan(p["scores"], p["values"], state, dtype=p["values"].dtype)
    return ref, base


def final_reference(p, ref, base):
    """The state after the last token: (lse [B, H], out [B, H, D]) in float64 and the dtype."""
    values = p["values"]
    if values.size(1) > 0:
        return (ref[1][:, -1], ref[0][:, -1]), (base[1][:, -1], base[0][:, -1])
    B, _, H, D = values.shape
    if p["lse"] is None:
        empty = (torch.full([B, H], -INF, dtype=F64), torch.zeros(B, H, D, dtype=F64))
        return empty, tuple(t.to(values.dtype) for t in empty)
    state = (p["lse"].double(), p["out"].double())
    return state, tuple(t.to(values.dtype) for t in state)


# Defects: each turns a valid problem into one with a known wrong argument, or returns None
# where it does not apply. The names are those an error's message may use for it.
NAMES = {"scores": {"scores"}, "values": {"values"}, "lse": {"state lse", "state_lse"},
         "out": {"state out", "state_out"}}
STEP_NAMES = {"scores": {"score"}, "values": {"value"}, "lse": {"state lse", "state_lse"},
              "out": {"state out", "state_out"}}


def defect_rank(data, p, name):
    t = p[name]
    if t is None:
        return None
    if t.dim() > 0 and data.draw(st.booleans(), label="drop a dim"):
        p[name] = t.sum(0) if t.size(0) == 0 else t.select(0, 0)
    else:
        p[name] = t.unsqueeze(data.draw(st.integers(0, t.dim()), label="new dim"))
    return {name}


def defect_size(data, p, name):
    t = p[name]
    if t is None:
        return None
    last = t.dim() - 1  # values' last dimension (D) must match only the state's
    dims = list(range(last)) + ([last] if name != "values" or p["lse"] is not None else [])
    if not dims:
        return None
    p[name] = grown(t, data.draw(st.sampled_from(dims), label="grown dim"))
    return {name}


def defect_dtype(data, p, name):
    t = p[name]
    if t is None:
        return None
    if name == "values":  # values (and scores with them) in a dtype the scan refuses
        bad = data.draw(st.sampled_from(BAD_DTYPES), label="bad dtype")
        p["values"], p["scores"] = t.to(bad), p["scores"].to(bad)
        return {"values"}
    if name == "scores":  # another dtype than values: any other float, or not a float
        other = [d for d in FLOATS + BAD_DTYPES if d != p["values"].dtype]
        p["scores"] = t.to(data.draw(st.sampled_from(other), label="scores dtype"))
        return {"scores"}
    p[name] = t.to(data.draw(st.sampled_from(BAD_DTYPES), label="state dtype"))  # floats are converted
    return {name}


def defect_last_dim(data, p, name):
    if p["values"].size(-1) < 2:
        return None
    p["values"] = strided_last(p["values"])
    return {"values"}


def defect_device(data, p, name, device):
    t = p[name]
    if t is None:
        return None
    p[name] = like_on_cpu(t) if device == "meta" else to_meta(t)
    return {name, "values"}


def defect_half_state(data, p, name):
    if p["lse"] is None:
        return None
    p[data.draw(st.sampled_from(["lse", "out"]), label="dropped")] = None
    return {"the state needs both"}


def defect_not_tensor(data, p, name):
    if p[name] is None:
        return None
    p[name] = data.draw(st.sampled_from([[1.0, 2.0], 1.5, "text"]), label="not a tensor")
    return {name}


DEFECTS = {
    "rank": defect_rank, "size": defect_size, "dtype": defect_dtype, "last dim": defect_last_dim,
    "device": defect_device, "half state": defect_half_state, "not a tensor": defect_not_tensor,
}


def draw_defects(data, p, device, names=NAMES):
    """0 to 2 defects applied to `p`; the union of the names an error may use (empty: valid)."""
    count = data.draw(st.sampled_from([0, 0, 1, 1, 2]), label="defects")
    wanted = set()
    for _ in range(count):
        kind = data.draw(st.sampled_from(sorted(DEFECTS)), label="defect")
        name = data.draw(st.sampled_from(["scores", "values", "lse", "out"]), label="defect on")
        if any(not isinstance(p[k], torch.Tensor) for k in p if p[k] is not None):
            break  # after a non-tensor, nothing more can be applied
        if kind == "device":
            made = defect_device(data, p, name, device)
        else:
            made = DEFECTS[kind](data, p, name)
        if made is not None:
            wanted |= {n for m in made for n in names.get(m, {m})}
    return wanted


def on_device(p, device):
    return {k: (to_meta(v) if device == "meta" else v) for k, v in p.items()}


# ---------------------------------------------------------------- modules: references


def plain_attention(attn, x, key_padding_mask, dtype, state_tokens=None):
    """What `attn` computes by definition, in `dtype` (float64: the reference; the module's
    dtype: what plain PyTorch gives), written from modules.md without aaren.modules:
    x [B, N, E] batch first; key_padding_mask [B, N] (bool, True = ignored, or float, added)."""
    def linear(t, lin):
        return F.linear(t, lin.weight.to(dtype), None if lin.bias is None else lin.bias.to(dtype))
    x = x.to(dtype)
    B, N, E = x.shape
    H, d = attn.num_heads, attn.head_dim
    k = linear(x, attn.k_proj).view(B, N, H, d)
    v = linear(x, attn.v_proj).view(B, N, H, d)
    s = (k * attn.query.to(dtype)).sum(-1) / math.sqrt(d)
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            s = s.masked_fill(key_padding_mask.unsqueeze(-1), -INF)
        else:
            s = s + key_padding_mask.to(dtype).unsqueeze(-1)
    out, _ = naive_scan(s, v, None, dtype=dtype)
    return linear(out.reshape(B, N, E), attn.out_proj)


def plain_layer(layer, x, key_padding_mask, dtype):
    """nn.TransformerEncoderLayer's computation (no dropout) around plain_attention."""
    def linear(t, lin):
        return F.linear(t, lin.weight.to(dtype), None if lin.bias is None else lin.bias.to(dtype))

    def norm(ln, t):
        return F.layer_norm(t, ln.normalized_shape, ln.weight.to(dtype),
                            None if ln.bias is None else ln.bias.to(dtype), ln.eps)

    def ff(t):
        return linear(layer.activation(linear(t, layer.linear1)), layer.linear2)

    x = x.to(dtype)
    if layer.norm_first:
        x = x + plain_attention(layer.self_attn, norm(layer.norm1, x), key_padding_mask, dtype)
        return x + ff(norm(layer.norm2, x))
    x = norm(layer.norm1, x + plain_attention(layer.self_attn, x, key_padding_mask, dtype))
    return norm(layer.norm2, x + ff(x))


def plain_encoder(encoder, x, key_padding_mask, dtype):
    x = x.to(dtype)
    for layer in encoder.layers:
        x = plain_layer(layer, x, key_padding_mask, dtype)
    if encoder.norm is not None:
        n = encoder.norm
        x = F.layer_norm(x, n.normalized_shape, n.weight.to(dtype), n.bias.to(dtype), n.eps)
    return x


def causal_masks(n, dtype, fill):
    later = torch.ones(n, n, dtype=torch.bool).triu(1)
    if dtype == torch.bool:
        return later
    return torch.zeros(n, n, dtype=F64).masked_fill(later, fill).to(dtype)


def draw_causal_mask(data, n, batch_heads):
    """None or a mask Aaren must accept: bool, or float with -inf / <= -1e4 above the
    diagonal, [N, N] or [B * H, N, N]."""
    kind = data.draw(st.sampled_from(["none", "bool", "float"]), label="attn_mask")
    if kind == "none":
        return None
    if kind == "bool":
        mask = causal_masks(n, torch.bool, None)
    else:
        dtype = data.draw(st.sampled_from(FLOATS), label="mask dtype")
        fill = data.draw(st.sampled_from([-INF, -1e4, -1e9, "finfo.min"]), label="mask fill")
        fill = torch.finfo(dtype).min if fill == "finfo.min" else fill
        mask = causal_masks(n, dtype, fill)
    if data.draw(st.booleans(), label="3-D mask"):
        mask = mask.expand(batch_heads, n, n)
    return mask


def draw_not_causal_mask(data, n, batch_heads):
    """A mask Aaren must refuse (and name attn_mask in the error)."""
    kind = data.draw(st.sampled_from(["full", "bias", "wrong shape", "int", "diagonal", "nan"]),
                     label="bad attn_mask")
    if kind == "wrong shape":
        return torch.zeros(n + 1, n)
    if kind == "int":
        return torch.zeros(n, n, dtype=torch.int32)
    if n < 2 and kind in ("full", "bias"):
        return torch.zeros(n + 1, n + 1)  # (no entry above the diagonal to get wrong)
    if kind == "full":
        return torch.zeros(n, n, dtype=torch.bool) if data.draw(st.booleans()) else torch.zeros(n, n)
    if kind == "bias":
        return causal_masks(n, torch.float32, -1.0)
    if kind == "diagonal":
        return torch.ones(n, n, dtype=torch.bool).triu(0) if n > 0 else torch.zeros(1, 1, dtype=torch.bool)
    mask = causal_masks(n, torch.float32, -INF)
    if n > 0:
        mask[n - 1, 0] = float("nan")
    else:
        mask = torch.full((1, 1), float("nan"))
    return mask


def draw_padding_mask(data, B, N, g):
    kind = data.draw(st.sampled_from(["none", "bool", "float"]), label="key_padding_mask")
    if kind == "none":
        return None
    masked = torch.rand(B, N, generator=g) < data.draw(st.sampled_from([0.2, 0.6, 1.0]), label="rate")
    if kind == "bool":
        return masked
    dtype = data.draw(st.sampled_from([F64, torch.float32]), label="kpm dtype")
    bias = torch.randn(B, N, generator=g, dtype=F64).masked_fill(masked, -INF)
    return bias.to(dtype)


# ---------------------------------------------------------------- modules: streams


def draw_stream_plan(data, N):
    """Segments (start, end, how): how is "prefill" (a chunk, maybe empty) or "step"."""
    plan, t = [], 0
    while t < N:
        if data.draw(st.booleans(), label="step"):
            plan.append((t, t + 1, "step"))
            t += 1
        else:
            end = data.draw(st.integers(t, N), label="chunk end")
            plan.append((t, end, "prefill"))
            t = end
    if not plan or data.draw(st.booleans(), label="empty chunk at the end"):
        plan.append((N, N, "prefill"))
    return plan


def stream_through(module, x_bf, plan, kpm, batch_first, state, grad):
    """Feeds x_bf [B, N, E] through module.prefill / module.step following `plan`; returns
    the outputs [B, N, E] and the last state."""
    outs = []
    with torch.set_grad_enabled(grad):
        for start, end, how in plan:
            if how == "step":
                y, state = module.step(x_bf[:, start], state)
                outs.append(y.unsqueeze(1))
            else:
                chunk = x_bf[:, start:end]
                chunk_kpm = None if kpm is None else kpm[:, start:end]
                y, state = module.prefill(chunk if batch_first else chunk.transpose(0, 1), state,
                                          chunk_kpm)
                outs.append(y if batch_first else y.transpose(0, 1))
    return torch.cat(outs, 1), state


def step_safe_padding(kpm, plan):
    """The padding mask with the tokens fed by `step` unmasked (step cannot mask a token)."""
    if kpm is None:
        return None
    kpm = kpm.clone()
    for start, end, how in plan:
        if how == "step":
            kpm[:, start:end] = False if kpm.dtype == torch.bool else 0.0
    return kpm
