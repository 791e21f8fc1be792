"""torch.compile compiles once over changing shapes (issue 28, "compile once").

Each model is compiled with fullgraph=True and run over the same six (batch, length) shapes,
in training (forward and backward: AOT autograd traces the backward, so that a size fixed
there shows up) and in inference, with padding masks and states, under dynamic=True and under
the default policy (automatic dynamic). The number of compilations must not change after the
first shape with dynamic=True, nor after the second with the default policy, and must be at
most the stock PyTorch module's over the same shapes, measured here as well. A size fixed
anywhere (a Python branch on a size, a size read as an int by an operator, its backward or
its fake kernel) shows as a recompilation at a new shape ("size mismatch at index 0" under
TORCH_LOGS=recompiles; TORCH_LOGS=dynamic names the line that added the guard).

Floats are specialized (torch._dynamo.config.specialize_float) for stock and Aaren modules
alike: with dynamic=True Dynamo otherwise traces a module's dropout probability as a symbolic
float and then restarts the first compilation to specialize it (two backend calls for one
compilation, stock modules included), which only doubles the time of these tests.

Sizes: no batch size or length is 1 (0/1 specialization) or equals a state's head count or
head width (duck sizing would make one symbol of both), and batch != length in each shape.
"""
import os

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch.utils._pytree import tree_leaves

import aaren
from module_reference import MODULE_MARKS

pytestmark = MODULE_MARKS

SHAPES = ((3, 5), (4, 7), (5, 9), (6, 11), (7, 6), (9, 3))  # (batch, length)
E, HEADS, FF = 16, 2, 32  # head width 8
MODES = ["train", "inference"]
POLICIES = ["dynamic", "default"]


@pytest.fixture(autouse=True)
def _specialized_floats():
    with torch._dynamo.config.patch(specialize_float=True):
        yield


def compilations(fn, inputs, mode, policy, compile_fn=None):
    """The number of compilations after each shape of SHAPES: fn(*inputs(batch, length))
    compiled with fullgraph=True (or by compile_fn(fn, backend=, dynamic=)); in training
    the sum of every output is differentiated."""
    torch._dynamo.reset()
    train = mode == "train"
    # Training: aot_eager, which traces the backward. Inference: Dynamo alone (its fake
    # tensors run the operators' meta kernels), the cheapest backend.
    counter = CompileCounterWithBackend("aot_eager") if train else CompileCounter()
    dynamic = True if policy == "dynamic" else None
    if compile_fn is None:
        compiled = torch.compile(fn, backend=counter, dynamic=dynamic, fullgraph=True)
    else:
        compiled = compile_fn(fn, backend=counter, dynamic=dynamic)
    counts = []
    with torch.set_grad_enabled(train):
        for batch, length in SHAPES:
            out = compiled(*inputs(batch, length))
            if train:
                sum(t.sum() for t in tree_leaves(out)).backward()
            counts.append(counter.frame_count)
    return counts


def check(counts, policy, stock=None):
    """No recompilation after the first shape (dynamic=True: every size symbolic from the
    start) or the second (default policy: the second shape makes the sizes that changed
    dynamic); at most 2 compilations, and no more than the stock module's."""
    settled = 0 if policy == "dynamic" else 1
    assert counts[settled:] == [counts[settled]] * (len(counts) - settled), counts
    assert counts[-1] <= 2, counts
    if stock is not None:
        assert counts[-1] <= stock[-1], (counts, stock)


def prepare(model, mode):
    return model.train(mode == "train")


def padding_mask(batch, length):
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, -2:] = True  # the first sequence right-padded
    return mask


def tokens(batch, length):
    return torch.randn(batch, length, E), padding_mask(batch, length)


def state(batch, mode):
    """A state to continue from; in training gradients reach it."""
    lse = torch.randn(batch, HEADS, dtype=torch.float64)
    out = torch.randn(batch, HEADS, E // HEADS, dtype=torch.float64)
    return lse.requires_grad_(mode == "train"), out.requires_grad_(mode == "train")


def tokens_and_states(mode, count):
    def inputs(batch, length):
        return (*tokens(batch, length), [state(batch, mode) for _ in range(count)])
    return inputs


def stock_encoder():
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)


def aaren_layer(**kw):
    return aaren.AarenEncoderLayer(E, HEADS, FF, dropout=0.1, batch_first=True, **kw)


_STOCK = {}
_FASTPATH_TRACEABLE = torch._C._dispatch_has_kernel_for_dispatch_key(
    "aten::_transformer_encoder_layer_fwd", "Meta")


def stock(mode, policy):
    """The stock nn.TransformerEncoder's compilations over SHAPES with a padding mask (the
    bound for every Aaren layer; measured once per session)."""
    if (mode, policy) not in _STOCK:
        encoder = prepare(stock_encoder(), mode)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # In inference (eval, no grad, a padding mask) the stock layer takes its fast path,
        # aten::_transformer_encoder_layer_fwd, which has a fake (Meta) kernel only from the
        # PyTorch of pytorch/pytorch#183916 on (2.11 has none: Dynamo stops with "Operator does
        # not support running with fake tensors", pytorch/pytorch#183841). Where it has none,
        # the stock layer is measured on its other path, the same module's ordinary operators.
        torch.backends.mha.set_fastpath_enabled(fastpath and _FASTPATH_TRACEABLE)
        try:
            _STOCK[mode, policy] = compilations(
                lambda x, m: encoder(x, src_key_padding_mask=m), tokens, mode, policy)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    return _STOCK[mode, policy]


# ---------------------------------------------------------------------- the layers

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
def test_aaren(mode, policy):
    """forward with a padding mask, then prefill and step continuing from a state."""
    attention = prepare(aaren.Aaren(E, HEADS, dropout=0.1, batch_first=True), mode)

    def fn(x, mask, states):
        y = attention(x, x, x, key_padding_mask=mask)[0]
        chunk, state = attention.prefill(x, states[0], mask)
        token, state = attention.step(x[:, -1], state)
        return y, chunk, token, state

    check(compilations(fn, tokens_and_states(mode, 1), mode, policy), policy, stock(mode, policy))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
def test_encoder_and_its_layer(mode, policy):
    """AarenEncoder's forward, prefill and step: its AarenEncoderLayer's (norm_first here;
    the other order is the converted encoder's)."""
    encoder = prepare(aaren.AarenEncoder(aaren_layer(norm_first=True), 1, norm=nn.LayerNorm(E)),
                      mode)

    def fn(x, mask, states):
        y = encoder(x, src_key_padding_mask=mask)
        chunk, states = encoder.prefill(x, states, mask)
        token, states = encoder.step(x[:, -1], states)
        return y, chunk, token, states

    check(compilations(fn, tokens_and_states(mode, 1), mode, policy), policy, stock(mode, policy))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
def test_converted_transformer_encoder(mode, policy):
    encoder = prepare(aaren.convert(stock_encoder()), mode)
    counts = compilations(lambda x, m: encoder(x, src_key_padding_mask=m), tokens, mode, policy)
    check(counts, policy, stock(mode, policy))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
def test_compile_step_with_changing_batch_size(mode, policy):
    """AarenEncoder.compile_step, two tokens per batch size. In inference the first starts
    from no state; in training both continue from states that require gradients (a state
    that does not, as the empty one, compiles a graph of its own whatever the shapes)."""
    encoder = prepare(aaren.AarenEncoder(aaren_layer(), 1), mode)

    def inputs(batch, length):
        states = [state(batch, mode)] if mode == "train" else None
        return torch.randn(batch, E), torch.randn(batch, E), states

    def compile_fn(fn, backend, dynamic):
        fast = encoder.compile_step(backend=backend, dynamic=dynamic)

        def two_tokens(x1, x2, states):
            y1, states = fast(x1, states)
            return y1, fast(x2, states)
        return two_tokens

    check(compilations(None, inputs, mode, policy, compile_fn=compile_fn), policy)


# ---------------------------------------------------------------------- Hugging Face

def _hf_model(family):
    os.environ["HF_HUB_OFFLINE"] = "1"
    if os.environ.get("AAREN_ALLOW_NO_HF") == "1":  # as tests/test_hf.py
        pytest.importorskip("transformers")
    import transformers
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=61, n_positions=64, n_embd=32, n_layer=1,
                                         n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    else:  # grouped key/value heads, rotary embeddings
        config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(config)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    return model


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_converted_hf_model(family, mode, policy):
    """A converted model's forward with a padding attention_mask; with dynamic=True, GPT-2
    against the same model unconverted (not measured elsewhere, for time's sake)."""
    import aaren.hf

    def inputs(batch, length):
        return torch.randint(0, 61, (batch, length)), (~padding_mask(batch, length)).long()

    counts = {}
    with_stock = family == "gpt2" and policy == "dynamic"
    for name in ("stock", "converted") if with_stock else ("converted",):
        model = _hf_model(family)
        if name == "converted":
            aaren.hf.convert(model)
        prepare(model, mode)
        counts[name] = compilations(
            lambda ids, mask: model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
            inputs, mode, policy)
    check(counts["converted"], policy, counts.get("stock"))
