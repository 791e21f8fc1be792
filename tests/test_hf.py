"""aaren.hf: Aaren inside Hugging Face transformers models (tiny models from config objects,
no downloads). transformers is required: CI installs the pinned version (scripts/run.sh);
set AAREN_ALLOW_NO_HF=1 to skip these tests on a machine without it."""
import copy
import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

if os.environ.get("AAREN_ALLOW_NO_HF") == "1":
    pytest.importorskip("transformers")

import transformers  # noqa: E402  (a missing transformers fails the suite: see the docstring)
from transformers import (BertConfig, BertModel, DecisionTransformerConfig,  # noqa: E402
                          DecisionTransformerModel, DynamicCache, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import aaren  # noqa: E402
import aaren.hf as ah  # noqa: E402
from naive import reference_scan  # noqa: E402

VOCAB = 61


def _quiet(config):
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None
    return config


def gpt2(layers=2, positions=320, **kw):
    torch.manual_seed(0)
    config = _quiet(GPT2Config(vocab_size=VOCAB, n_positions=positions, n_embd=32, n_layer=layers,
                               n_head=4, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **kw))
    return GPT2LMHeadModel(config).double().eval()


def llama(cls=LlamaForCausalLM, config_cls=LlamaConfig, **kw):
    torch.manual_seed(0)
    config = _quiet(config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, **kw))
    return cls(config).double().eval()


def converted(model):
    ah.convert(model)
    torch.manual_seed(1)  # queries of a trained scale: a fresh N(0, 1/2) query gives near-uniform attention
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ah._AarenHFAttention):
                m.query.normal_(std=3.0)
    return model


def prompt(batch=2, n=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, n), generator=g)


def greedy_loop(model, ids, steps, attention_mask=None):
    """The reference: argmax of a full forward without any cache, token by token."""
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def gen(model, ids, steps, **kw):
    return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          pad_token_id=0, **kw)


# ------------------------------------------------------------------ import and registration

def test_import_aaren_never_imports_transformers_and_hf_says_how_to_install():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'):\n"
        "            raise ImportError('no transformers here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import aaren\n"
        "assert 'transformers' not in sys.modules, 'import aaren imported transformers'\n"
        "try:\n"
        "    import aaren.hf\n"
        "except ImportError as e:\n"
        "    assert \"pip install --no-build-isolation '.[hf]'\" in str(e), str(e)\n"
        "    print('OK')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "OK", result.stderr


def test_registration_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    ah.register()
    first = (AttentionInterface._global_mapping["aaren"], AttentionMaskInterface._global_mapping["aaren"])
    ah.register()
    ah.register()
    assert (AttentionInterface._global_mapping["aaren"],
            AttentionMaskInterface._global_mapping["aaren"]) == first
    # Two conversions in a row, and converting twice, work and agree.
    a, b = converted(gpt2()), converted(gpt2())
    ah.convert(a)  # nothing left to convert: unchanged
    ids = prompt()
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_an_unconverted_model_with_attn_implementation_aaren_raises():
    model = gpt2()
    model.config._attn_implementation = "aaren"
    with pytest.raises(RuntimeError, match="aaren.hf.convert"):
        model(prompt())


# ------------------------------------------------------------------ convert: weights and forward

def test_gpt2_convert_copies_weights_and_equals_a_reference_aaren():
    model = gpt2()
    sources = [copy.deepcopy(block.attn) for block in model.transformer.h]
    converted(model)
    e = 32
    for block, source in zip(model.transformer.h, sources):
        attn = block.attn
        assert isinstance(attn, ah.AarenGPT2Attention) and not hasattr(attn, "c_attn")
        assert torch.equal(attn.k_proj.weight, source.c_attn.weight[:, e:2 * e].t())
        assert torch.equal(attn.v_proj.weight, source.c_attn.weight[:, 2 * e:].t())
        assert torch.equal(attn.k_proj.bias, source.c_attn.bias[e:2 * e])
        assert torch.equal(attn.v_proj.bias, source.c_attn.bias[2 * e:])
        assert torch.equal(attn.c_proj.weight, source.c_proj.weight)
        assert attn.scaling == source.scaling
        # The reference: aaren.Aaren (the nn.MultiheadAttention drop-in) with these weights.
        ref = aaren.Aaren(e, 4, batch_first=True, dtype=torch.float64)
        with torch.no_grad():
            ref.k_proj.weight.copy_(attn.k_proj.weight)
            ref.k_proj.bias.copy_(attn.k_proj.bias)
            ref.v_proj.weight.copy_(attn.v_proj.weight)
            ref.v_proj.bias.copy_(attn.v_proj.bias)
            ref.out_proj.weight.copy_(source.c_proj.weight.t())
            ref.out_proj.bias.copy_(source.c_proj.bias)
            ref.query.copy_(attn.query)
        x = torch.randn(3, 7, e, dtype=torch.float64)
        got, weights = attn(x)
        assert weights is None
        torch.testing.assert_close(got, ref(x, x, x)[0], rtol=0, atol=1e-10)
    assert model.config._attn_implementation == "aaren"
    assert model.config.aaren_converted == ["transformer.h.0.attn", "transformer.h.1.attn"]


def test_gpt2_scale_by_inverse_layer_idx_is_kept():
    model = gpt2(scale_attn_by_inverse_layer_idx=True)
    ah.convert(model)
    assert model.transformer.h[1].attn.scaling == pytest.approx(8 ** -0.5 / 2)  # head_dim 8, layer 1
    assert model.transformer.h[0].attn.scaling == pytest.approx(8 ** -0.5)


def _rope_reference(keys, cos, sin):
    """RoPE written out (rotate-half convention: pairs (i, i + D/2)), from the model's own
    cos/sin [B, N, D] (they are inputs to the attention module), independent of
    transformers' apply_rotary_pos_emb."""
    half = keys.size(-1) // 2
    cos, sin = cos[:, :, None], sin[:, :, None]
    k1, k2 = keys[..., :half], keys[..., half:]
    return torch.cat([k1 * cos[..., :half] - k2 * sin[..., :half],
                      k2 * cos[..., half:] + k1 * sin[..., half:]], -1)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_llama_gqa_rope_convert_equals_a_reference(family):
    """4 heads, 2 KV heads, RoPE on keys (and Qwen3's k_norm): the converted layer against
    the formula written out: scores = scaling * q_h . RoPE(k_{g(h)}), then the naive
    masked-softmax scan of tests/naive.py, then o_proj."""
    model = llama() if family == "llama" else llama(Qwen3ForCausalLM, Qwen3Config, head_dim=8)
    source = copy.deepcopy(model.model.layers[0].self_attn)
    converted(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, ah.AarenLlamaAttention) and not hasattr(attn, "q_proj")
    for name in ("k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(attn, name).weight, getattr(source, name).weight)
    b, n, hd = 2, 9, 8
    x = torch.randn(b, n, 32, dtype=torch.float64)
    positions = torch.arange(n).expand(b, n) + 3
    cos_sin = model.model.rotary_emb(x, positions)
    got, _ = attn(x, position_embeddings=cos_sin)
    keys = source.k_proj(x).view(b, n, 2, hd)
    if family == "qwen3":
        keys = source.k_norm(keys)
    keys = _rope_reference(keys, *cos_sin)
    values = source.v_proj(x).view(b, n, 2, hd)
    group = torch.tensor([0, 0, 1, 1])  # query head -> its key/value head
    scores = (keys[:, :, group] * attn.query).sum(-1) * hd ** -0.5
    out, _ = reference_scan(scores, values[:, :, group])
    torch.testing.assert_close(got, source.o_proj(out.reshape(b, n, 32)), rtol=0, atol=1e-10)


# ------------------------------------------------------------------ training

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_reduces_the_loss_and_every_parameter_gets_a_gradient(family):
    if family == "gpt2":
        model = gpt2(layers=2, positions=64)
        model.transformer.h[0].attn.attn_dropout.p = 0.1  # token dropout in training
    else:
        model = llama(attention_dropout=0.1)
    ah.convert(model)
    assert model.model.layers[0].self_attn.dropout == 0.1 if family == "llama" \
        else model.transformer.h[0].attn.dropout == 0.1
    model.float().train()
    text = torch.arange(48).remainder(7).view(3, 16) + 3  # a repeating pattern to learn
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for i in range(30):
        loss = model(text, labels=text).loss
        optimizer.zero_grad()
        loss.backward()
        if i == 0:  # DDP without find_unused_parameters needs every parameter used
            unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert unused == []
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------ generation

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_the_no_cache_argmax_loop(family):
    model = converted(gpt2() if family == "gpt2" else llama())
    ids = prompt()
    out = gen(model, ids, 12, past_key_values=ah.AarenCache(model.config))
    assert torch.equal(out, greedy_loop(model, ids, 12))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_step_by_step_and_chunked_logits_equal_the_full_forward(family):
    model = converted(gpt2() if family == "gpt2" else llama())
    ids = prompt(n=12)
    full = model(ids, use_cache=False).logits
    cache = ah.AarenCache()
    pieces = [model(ids[:, :4], past_key_values=cache, use_cache=True).logits]  # a chunk
    pieces.append(model(ids[:, 4:7], past_key_values=cache, use_cache=True).logits)  # a chunk
    for t in range(7, 12):  # then one token at a time (aaren.step)
        pieces.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-10)


def test_chunked_prefill_in_generate():
    model = converted(llama())
    ids = prompt(n=11)
    whole = gen(model, ids, 6)
    chunked = gen(model, ids, 6, prefill_chunk_size=3)
    assert torch.equal(whole, chunked)


def test_state_bytes_do_not_depend_on_the_tokens_generated():
    model = converted(gpt2())
    ids = prompt(batch=1)
    sizes = {}
    for steps in (4, 32, 256):
        cache = ah.AarenCache(model.config)
        out = gen(model, ids, steps, past_key_values=cache)
        assert out.shape[1] == 5 + steps and cache.get_seq_length() == 5 + steps - 1
        sizes[steps] = cache.state_bytes()
    layers, heads, hd = 2, 4, 8
    assert sizes == {s: layers * (heads + heads * hd) * 8 for s in sizes}, sizes
    dynamic = DynamicCache()
    gpt2()(ids, past_key_values=dynamic, use_cache=True)  # the original model's cache grows
    assert ah.cache_bytes(dynamic) > 0


def test_the_default_cache_path_keeps_aaren_states():
    model = converted(llama())
    ids = prompt()
    result = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                            pad_token_id=0, return_dict_in_generate=True)
    cache = result.past_key_values
    assert isinstance(cache, DynamicCache)
    assert all(isinstance(layer, ah.AarenLayer) for layer in cache.layers)
    assert [layer.out.shape for layer in cache.layers] == [torch.Size([2, 4, 8])] * 2
    assert torch.equal(result.sequences, greedy_loop(model, ids, 8))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padding_gives_each_row_what_it_gives_alone(family):
    model = converted(gpt2() if family == "gpt2" else llama())
    long, short = prompt(1, 7, seed=3), prompt(1, 4, seed=4)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    kw = dict(output_logits=True, return_dict_in_generate=True)
    batch = gen(model, ids, 8, attention_mask=mask, **kw)
    alone = [gen(model, long, 8, **kw), gen(model, short, 8, **kw)]
    assert torch.equal(batch.sequences[0:1, 7:], alone[0].sequences[:, 7:])
    assert torch.equal(batch.sequences[1:2, 7:], alone[1].sequences[:, 4:])
    for row in range(2):  # generate returns float32 logits
        for step in range(8):
            torch.testing.assert_close(batch.logits[step][row], alone[row].logits[step][0],
                                       rtol=1e-6, atol=1e-6)


def test_sampling_matches_the_no_cache_path():
    model = converted(gpt2())
    ids = prompt()
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        outs.append(model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True,
                                   top_k=0, pad_token_id=0, use_cache=use_cache))
    assert torch.equal(*outs)


def test_beam_search_matches_the_no_cache_path():
    model = converted(llama())
    ids = prompt()
    with_state = gen(model, ids, 8, num_beams=3, num_return_sequences=2,
                     past_key_values=ah.AarenCache())
    recomputed = gen(model, ids, 8, num_beams=3, num_return_sequences=2, use_cache=False)
    assert torch.equal(with_state, recomputed)


def test_cache_reorder_and_select_on_known_states():
    layer = ah.AarenLayer()
    lse = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    out = torch.arange(3, dtype=torch.float64).view(3, 1, 1).expand(3, 1, 2).clone()
    layer.set_state((lse, out), 5)
    assert layer.get_seq_length() == 5 and layer.get_mask_sizes(2) == (7, 0)
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert layer.lse.flatten().tolist() == [2.0, 0.0, 0.0]
    assert layer.out[:, 0, 1].tolist() == [2.0, 0.0, 0.0]
    layer.batch_select_indices(torch.tensor([0, 1]))
    assert layer.lse.flatten().tolist() == [2.0, 0.0]
    layer.batch_repeat_interleave(2)
    assert layer.lse.flatten().tolist() == [2.0, 2.0, 0.0, 0.0]
    assert layer.nbytes == 4 * 8 + 4 * 2 * 8
    layer.crop(0)
    with pytest.raises(ValueError, match="cannot drop tokens"):
        layer.crop(-1)
    with pytest.raises(RuntimeError, match="not keys and values"):
        layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    layer.reset()
    assert layer.state is None and layer.get_seq_length() == 0
    cache = ah.AarenCache(gpt2().config)
    assert len(cache.layers) == 2 and cache.states == [None, None]


# ------------------------------------------------------------------ Decision Transformer

def test_decision_transformer_streams_one_timestep_at_a_time():
    torch.manual_seed(0)
    config = DecisionTransformerConfig(state_dim=5, act_dim=3, hidden_size=32, n_layer=2,
                                       n_head=4, max_ep_len=64, n_positions=256,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = converted(DecisionTransformerModel(config).double().eval())
    b, t = 2, 6
    states = torch.randn(b, t, 5, dtype=torch.float64)
    actions = torch.randn(b, t, 3, dtype=torch.float64)
    returns = torch.randn(b, t, 1, dtype=torch.float64)
    timesteps = torch.arange(t).expand(b, t) + 4
    full = model(states=states, actions=actions, returns_to_go=returns, timesteps=timesteps,
                 attention_mask=torch.ones(b, t, dtype=torch.long))
    stream = ah.DecisionTransformerStream(model)
    sizes = set()
    for i in range(t):
        action = stream.act(returns[:, i], states[:, i], timesteps[:, i])
        torch.testing.assert_close(action, full.action_preds[:, i], rtol=0, atol=1e-10)
        state_pred, return_pred = stream.observe(actions[:, i])
        torch.testing.assert_close(state_pred, full.state_preds[:, i], rtol=0, atol=1e-10)
        torch.testing.assert_close(return_pred, full.return_preds[:, i], rtol=0, atol=1e-10)
        sizes.add(stream.cache.state_bytes())
    assert len(sizes) == 1 and stream.cache.get_seq_length() == 3 * t
    with pytest.raises(RuntimeError, match="act"):
        stream.observe(actions[:, 0])
    with pytest.raises(ValueError, match="convert the model first"):
        ah.DecisionTransformerStream(DecisionTransformerModel(config))


# ------------------------------------------------------------------ save and load

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_and_load_round_trip(family, tmp_path):
    model = converted(gpt2() if family == "gpt2" else llama())
    model.save_pretrained(tmp_path)
    cls = type(model)
    loaded = ah.from_pretrained(cls, str(tmp_path))
    assert loaded.config._attn_implementation == "aaren"
    ids = prompt()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert torch.equal(gen(loaded, ids, 6), gen(model, ids, 6))
    if family == "gpt2":  # tied embeddings stay tied
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    plain = tmp_path / "plain"
    (gpt2() if family == "gpt2" else llama()).save_pretrained(plain)
    with pytest.raises(ValueError, match="not a model saved after aaren.hf.convert"):
        ah.from_pretrained(cls, str(plain))
    # HF's own loader cannot rebuild the converted modules: the model it builds must refuse
    # to run (a random q_proj in place of the learned query), not run silently.
    wrong = cls.from_pretrained(str(tmp_path))
    assert wrong.config._attn_implementation == "aaren"
    with pytest.raises(RuntimeError, match=r"aaren\.hf\.from_pretrained"):
        wrong(ids)


# ------------------------------------------------------------------ refusals

def test_cross_attention_is_refused_before_anything_changes():
    model = gpt2(add_cross_attention=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cross-attention"):
        ah.convert(model)
    assert type(model.transformer.h[0].attn).__name__ == "GPT2Attention"
    assert model.config._attn_implementation != "aaren"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bidirectional_encoder_is_refused():
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match="bidirectional") as error:
        ah.convert(BertModel(config))
    # one reason per layer: the wrapper BertAttention does not repeat its inner module's
    lines = str(error.value).splitlines()[1:]
    assert len(lines) == 2 and all("bidirectional" in line for line in lines), lines


def test_sliding_window_layers_are_refused():
    with pytest.raises(ValueError, match="sliding-window"):
        ah.convert(llama(MistralForCausalLM, MistralConfig, sliding_window=4))
    with pytest.raises(ValueError, match="sliding"):
        ah.convert(llama(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True,
                         sliding_window=4, max_window_layers=0))
    mistral = llama(MistralForCausalLM, MistralConfig, sliding_window=None)  # no window: fine
    converted(mistral)
    ids = prompt()
    assert torch.equal(gen(mistral, ids, 5), greedy_loop(mistral, ids, 5))


def test_bad_names_and_unsupported_modules_are_refused():
    with pytest.raises(ValueError, match="no modules named"):
        ah.convert(gpt2(), names=["transformer.h.9.attn"])
    with pytest.raises(TypeError, match=r"names=\['transformer.h.0.attn'\]"):
        ah.convert(gpt2(), names="transformer.h.0.attn")
    with pytest.raises(ValueError, match="not one of the supported"):
        ah.convert(gpt2(), names=["transformer.h.0.mlp"])
    model = ah.convert(gpt2(), names=["transformer.h.1.attn"])  # only some layers: allowed
    assert type(model.transformer.h[0].attn).__name__ == "GPT2Attention"


def test_assisted_decoding_is_refused():
    model = converted(gpt2())
    with pytest.raises(ValueError, match="stateful"):
        model.generate(prompt(batch=1), assistant_model=converted(gpt2()), max_new_tokens=3,
                       pad_token_id=0)
    with pytest.raises(ValueError, match="stateful"):
        model.generate(prompt(batch=1), prompt_lookup_num_tokens=2, max_new_tokens=3,
                       pad_token_id=0)


def test_a_cache_with_keys_and_values_and_4d_masks_are_refused():
    model = converted(gpt2())
    ids = prompt()
    filled = DynamicCache()
    gpt2()(ids, past_key_values=filled, use_cache=True)
    with pytest.raises(ValueError, match="AarenCache"):
        model(ids, past_key_values=filled, use_cache=True)
    mask4d = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="4D"):
        model(ids, attention_mask=mask4d)


def test_packed_sequences_are_refused_and_attention_weights_are_none():
    model = converted(llama())
    ids = prompt(batch=1, n=6)
    with pytest.raises(ValueError, match="packed sequences"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=False)
    out = model(ids, output_attentions=True)
    assert out.attentions is None or all(a is None for a in out.attentions)


def test_the_example_runs():
    """examples/hf_gpt2_generate.py in its smoke mode (it checks the state size itself)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, os.path.join(root, "examples", "hf_gpt2_generate.py"),
                             "--smoke"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Aaren state 4,224 bytes" in result.stdout, result.stdout


def test_a_static_cache_is_refused():
    model = converted(gpt2())
    with pytest.raises(ValueError, match="StaticLayer"):
        gen(model, prompt(), 3, cache_implementation="static")


def test_encoder_decoder_models_are_refused():
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    with pytest.raises(ValueError, match="encoder-decoder"):
        ah.convert(T5ForConditionalGeneration(config))


def test_a_cache_reused_for_another_batch_is_refused():
    model = converted(llama())
    cache = ah.AarenCache(model.config)
    model(prompt(), past_key_values=cache, use_cache=True)
    other = prompt(batch=3, n=3)
    with pytest.raises(ValueError, match="use a new AarenCache for a new batch"):
        model(other, past_key_values=cache, use_cache=True)
