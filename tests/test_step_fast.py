"""The one-token step's fast paths: the stacked score/value projection cached in inference
(never used stale) and `AarenEncoder.compile_step` (equal to the eager step, one graph from
the first token on). Speed is measured in benchmarks/bench_step_cpu.py, not here.
"""
import copy
import io

import pytest
import torch
from torch import nn

from aaren import Aaren, AarenEncoder, AarenEncoderLayer

E, H = 8, 2


def make_attention(bias=True, dtype=torch.float64):
    attention = Aaren(E, H, bias=bias, dtype=dtype).eval()
    with torch.no_grad():  # non-zero biases, so that a stale bias would show
        for linear in (attention.k_proj, attention.v_proj, attention.out_proj):
            if linear.bias is not None:
                linear.bias.normal_()
    return attention


def stream(module, xs, state=None):
    """Steps `module.step` (or a step function) over the tokens xs[0], xs[1], ..."""
    step = module.step if isinstance(module, (nn.Module, torch.jit.ScriptModule)) else module
    ys = []
    for x in xs:
        y, state = step(x, state)
        ys.append(y)
    return torch.stack(ys), state


def fresh_step(attention, x, state):
    """The step of an uncached copy of `attention` (autograd on: the cache is off)."""
    reference = copy.deepcopy(attention)
    assert "_step_cache" not in reference.__dict__
    if state is not None:  # a clone is a normal tensor even if made in inference mode
        state = tuple(t.clone() for t in state)
    with torch.enable_grad():
        y, new_state = reference.step(x, state)
    return y.detach(), tuple(t.detach() for t in new_state)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_cached_step_equals_forward(bias, context):
    attention = make_attention(bias)
    x = torch.randn(3, 7, E, dtype=torch.float64)
    want = attention(x, x, x)[0]  # [N, B, E] (batch_first=False)
    with context():
        got, _ = stream(attention, x)
        assert "_step_cache" in attention.__dict__
        again, _ = stream(attention, x)  # every token from the cache
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, want, rtol=1e-12, atol=1e-12)


def test_one_sided_biases():
    """Only one of the score (k_proj) and value (v_proj) projections has a bias."""
    for missing in ("k_proj", "v_proj"):
        attention = make_attention()
        getattr(attention, missing).bias = None
        x = torch.randn(4, 2, E, dtype=torch.float64)
        with torch.no_grad():
            got, _ = stream(attention, x)
        torch.testing.assert_close(got, attention(x, x, x)[0], rtol=1e-12, atol=1e-12)


def test_cache_is_used(monkeypatch):
    attention = make_attention()
    calls = []
    build = Aaren._step_projection
    monkeypatch.setattr(Aaren, "_step_projection", lambda self: calls.append(1) or build(self))
    x = torch.randn(5, 2, E, dtype=torch.float64)
    with torch.no_grad():
        stream(attention, x)
    assert len(calls) == 1  # built once, used for 5 tokens
    with torch.enable_grad():  # autograd on: rebuilt at every call, the cache left alone
        stream(attention, x)
    assert len(calls) == 6
    attention.train()
    with torch.no_grad():
        stream(attention, x)
    assert len(calls) == 11 and "_step_cache" not in attention.__dict__


def _in_place(attention):
    with torch.no_grad():
        attention.query.add_(0.5)


def _in_place_value_bias(attention):
    with torch.no_grad():
        attention.v_proj.bias.mul_(-2.0)


def _optimizer_step(attention):
    optimizer = torch.optim.SGD(attention.parameters(), lr=0.5)
    x = torch.randn(4, 2, E, dtype=torch.float64)
    with torch.enable_grad():
        attention(x, x, x)[0].square().sum().backward()
    optimizer.step()


def _load_state_dict(attention):
    attention.load_state_dict(make_attention().state_dict())


def _load_state_dict_assign(attention):
    attention.load_state_dict(make_attention().state_dict(), assign=True)


def _new_parameter(attention):
    attention.k_proj.weight = nn.Parameter(torch.randn_like(attention.k_proj.weight))


def _new_module(attention):
    attention.v_proj = nn.Linear(E, E, dtype=torch.float64)


def _bias_removed(attention):
    attention.k_proj.bias = None


def _data_replaced(attention):
    attention.query.data = torch.randn_like(attention.query)


def _data_written_then_eval(attention):
    attention.k_proj.weight.data.mul_(3.0)  # invisible to version counters: eval() resets
    attention.eval()


def _train_then_eval(attention):
    attention.train()
    _in_place(attention)
    attention.eval()


MUTATIONS = [_in_place, _in_place_value_bias, _optimizer_step, _load_state_dict,
             _load_state_dict_assign, _new_parameter, _new_module, _bias_removed,
             _data_replaced, _data_written_then_eval, _train_then_eval]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_stale_cache_is_never_used(mutate, context):
    attention = make_attention()
    first, x = torch.randn(2, 2, E, dtype=torch.float64)
    with context():
        _, state = attention.step(first)  # fills the cache
        before, _ = attention.step(x, state)
        assert "_step_cache" in attention.__dict__
    mutate(attention)
    with context():
        after, _ = attention.step(x, state)
    want, _ = fresh_step(attention, x, state)
    assert not torch.allclose(after, before)  # the change matters to the output
    torch.testing.assert_close(after, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtype_move_drops_the_cache(dtype):
    attention = make_attention()
    x = torch.randn(2, E, dtype=torch.float64)
    with torch.inference_mode():
        attention.step(x)
        attention.to(dtype)
        assert "_step_cache" not in attention.__dict__
        y, (lse, out) = attention.step(x.to(dtype))
    assert y.dtype == dtype and out.dtype == torch.float64
    torch.testing.assert_close(y, fresh_step(attention, x.to(dtype), None)[0])


def test_gradients_reach_every_projection_with_autograd_on():
    attention = make_attention()
    first, x = torch.randn(2, 2, E, dtype=torch.float64)
    with torch.no_grad():
        attention.step(x)  # a cache exists, and must not be used with autograd on
    y, _ = attention.step(x, attention.step(first)[1])
    y.sum().backward()
    for p in (attention.query, attention.k_proj.weight, attention.k_proj.bias,
              attention.v_proj.weight, attention.v_proj.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_copies_and_pickles_start_without_a_cache():
    attention = make_attention()
    x = torch.randn(2, E, dtype=torch.float64)
    with torch.no_grad():
        want, _ = attention.step(x)
    assert "_step_cache" in attention.__dict__
    buffer = io.BytesIO()
    torch.save(attention, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(attention), torch.load(buffer, weights_only=False)):
        assert "_step_cache" not in copied.__dict__
        with torch.no_grad():
            torch.testing.assert_close(copied.step(x)[0], want, rtol=0, atol=0)
    assert "_step_cache" in attention.__dict__  # the original keeps its own


def test_parameters_made_in_inference_mode():
    """Such parameters have no version counter: the projection is rebuilt at every call."""
    with torch.inference_mode():
        attention = make_attention()
        x = torch.randn(3, 2, E, dtype=torch.float64)
        got, _ = stream(attention, x)
        assert "_step_cache" not in attention.__dict__
        torch.testing.assert_close(got, attention(x, x, x)[0], rtol=1e-12, atol=1e-12)
        attention.query.add_(1.0)  # allowed in inference mode, and seen
        torch.testing.assert_close(stream(attention, x)[0], attention(x, x, x)[0],
                                   rtol=1e-12, atol=1e-12)


class _TwoSteps(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, first, x):
        return self.attention.step(x, self.attention.step(first)[1])[0]


def test_tracing_does_not_bake_the_cache_in():
    attention = make_attention()
    first, x = torch.randn(2, 2, E, dtype=torch.float64)
    with torch.no_grad():
        attention.step(x)  # a cache exists
        traced = torch.jit.trace(_TwoSteps(attention), (first, x), check_trace=False)
        before = traced(first, x)
        _in_place(attention)
        after = traced(first, x)
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after, _TwoSteps(attention)(first, x), rtol=1e-12, atol=1e-12)


def test_scripted_step_equals_cached_eager_step():
    layer = AarenEncoderLayer(E, H, 16, dropout=0.0, dtype=torch.float64)
    stack = AarenEncoder(layer, 2).eval()
    scripted = torch.jit.script(stack)
    xs = torch.randn(6, 3, E, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stream(scripted, xs)[0], stream(stack, xs)[0],
                                   rtol=1e-12, atol=1e-12)


# ---- AarenEncoder.compile_step ------------------------------------------------------


def make_stack(dtype=torch.float32):
    layer = AarenEncoderLayer(E, H, 16, dropout=0.0, batch_first=True, dtype=dtype)
    return AarenEncoder(layer, 2).eval()


def test_empty_states_equal_none():
    stack = make_stack()
    x = torch.randn(3, E)
    states = stack.empty_states(x)
    assert len(states) == 2
    for lse, out in states:
        assert lse.shape == (3, H) and out.shape == (3, H, E // H)
        assert lse.dtype == out.dtype == torch.float64
    with torch.no_grad():
        y_none, s_none = stack.step(x)
        y_empty, s_empty = stack.step(x, states)
    torch.testing.assert_close(y_empty, y_none, rtol=0, atol=0)
    for a, b in zip(s_empty, s_none):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for bad in (torch.randn(E), torch.randn(3, E + 1), torch.randn(2, 3, E)):  # as step refuses
        with pytest.raises(ValueError, match=r"empty_states: expected x of shape \[B, E\]"):
            stack.empty_states(bad)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_compile_step_equals_eager_in_one_graph(context):
    """Default options (Inductor): the compiled stream equals the eager one,
    without a recompile when the states go from None to tensors, and sees parameter
    updates."""
    torch._dynamo.reset()
    stack = make_stack()
    fast = stack.compile_step()
    xs = torch.randn(8, 2, E)
    with context(), torch._dynamo.config.patch(error_on_recompile=True):
        want, want_states = stream(stack, xs)
        got, got_states = stream(fast, xs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for (lse, out), (lse_ref, out_ref) in zip(got_states, want_states):
            torch.testing.assert_close(lse, lse_ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
        stack.layers[1].self_attn.query.mul_(-1.0)  # in place: the same graph, new values
        before = got
        got, _ = stream(fast, xs)
        want, _ = stream(stack, xs)
    assert not torch.allclose(got, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_step_other_backend_and_errors():
    torch._dynamo.reset()
    stack = make_stack()
    fast = stack.compile_step(backend="aot_eager")
    xs = torch.randn(4, 1, E)
    with torch.no_grad():
        torch.testing.assert_close(stream(fast, xs)[0], stream(stack, xs)[0], rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="expected 2 states"):
            fast(xs[0], stack.empty_states(xs[0])[:1])
        states = stack.empty_states(xs[0])
        for bad in (xs, torch.randn(1, E + 1)):  # with and without states
            with pytest.raises(ValueError, match=r"shape \[B, E\]"):
                fast(bad)
            with pytest.raises(ValueError, match=r"shape \[B, E\]"):
                fast(bad, states)
        with pytest.raises(RuntimeError, match="aaren.attention_step: state lse.s batch dimension has 1 where x has"):
            fast(torch.randn(3, E), states)  # states of batch 1


def test_value_projection_with_a_hook_or_a_wrapper_is_called():
    """A v_proj that is not a plain nn.Linear, or one with a hook, is called as a module
    by step (as by forward), not bypassed through its weight."""
    class Scaled(nn.Linear):  # a wrapper that changes the output, as a LoRA layer would
        def forward(self, x):
            return 2.0 * super().forward(x)

    x = torch.randn(5, 2, E, dtype=torch.float64)
    for change in ("hook", "subclass"):
        attention = make_attention()
        if change == "hook":
            attention.v_proj.register_forward_hook(lambda module, args, out: out * 3.0)
        else:
            scaled = Scaled(E, E, dtype=torch.float64)
            scaled.load_state_dict(attention.v_proj.state_dict())
            attention.v_proj = scaled
        with torch.no_grad():
            got, _ = stream(attention, x)
            want = attention(x, x, x)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compile_steps_of_many_encoders_do_not_share_a_cache():
    """Each compile_step has its own compiled-graph cache: more encoders than Dynamo's
    recompile limit (8 graphs per code object) all stay compiled (fullgraph would raise)."""
    torch._dynamo.reset()
    x = torch.randn(1, E)
    with torch.no_grad():
        for layers in range(1, torch._dynamo.config.recompile_limit + 3):  # graphs differ
            stack = AarenEncoder(AarenEncoderLayer(E, H, 16, dropout=0.0), layers).eval()
            fast = stack.compile_step(backend="eager")
            y, states = fast(x)
            torch.testing.assert_close(fast(x, states)[0], stack.step(x, states)[0],
                                       rtol=1e-6, atol=1e-6)
