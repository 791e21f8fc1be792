"""Aaren inside Hugging Face ``transformers`` models (optional: the ``hf`` extra, ``pip install --no-build-isolation '.[hf]'``).

- ``convert(model, names=None)``: replaces the causal self-attention of GPT-2,
  DecisionTransformer and Llama-family models (Llama, Mistral, Qwen2, Qwen3) by Aaren modules
  that keep the key, value and output projections and learn one query per head.
- ``AarenCache``: a ``transformers`` ``Cache`` holding one ``(lse, out)`` state per layer
  (``AarenLayer``), of constant size: ``model.generate(ids, past_key_values=AarenCache())``.
  A plain ``model.generate(ids)`` gets the same state: a converted attention module replaces
  the empty ``DynamicLayer`` of its cache slot by an ``AarenLayer`` at its first call.
- ``DecisionTransformerStream``: a converted ``DecisionTransformerModel`` stepped one
  timestep at a time in constant memory.
- ``from_pretrained(cls, path)``: reloads a converted model saved with ``save_pretrained``.

How it fits into ``transformers`` (the design of HF's own constant-state layers, Mamba's and
Qwen3-Next's, and of flash-linear-attention's ``FLACache``): the attention module itself
reads and writes its layer's state through the ``Cache`` object, by ``layer_idx``. The name
"aaren" is registered with ``AttentionInterface`` (the function raises: only converted
modules can compute Aaren) and with ``AttentionMaskInterface``, whose function hands each
converted module the padding of its current tokens (``[B, N]`` bool, True = a real token)
instead of a 4D mask; a padding token gets score -inf and leaves the state unchanged.

The math is the paper's (Feng et al., 2024, "Attention as an RNN", section 3) as computed by
``aaren.scan``/``aaren.step`` (docs/design.md); the layer wiring is described in docs/hf.md.
"""
import copy
import json
import logging
import os
import sys
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

try:
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, EncoderDecoderCache
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
    from transformers.pytorch_utils import Conv1D
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("aaren.hf needs Hugging Face transformers: in an aaren checkout, "
                      "pip install --no-build-isolation '.[hf]'") from error

from .functional import scan as _scan
from .functional import step as _step
from .modules import drop_token_contributions, init_learned_query_

__all__ = ["ATTN_IMPLEMENTATION", "AarenCache", "AarenLayer", "AarenGPT2Attention",
           "AarenLlamaAttention", "DecisionTransformerStream", "cache_bytes", "convert",
           "from_pretrained", "register", "LLAMA_FAMILY", "GPT2_FAMILY"]

_log = logging.getLogger("aaren")

ATTN_IMPLEMENTATION = "aaren"
"""The ``attn_implementation`` name a converted model's config carries."""

GPT2_FAMILY = {"GPT2Attention", "DecisionTransformerGPT2Attention"}
"""Attention classes converted as GPT-2's (fused ``c_attn`` Conv1D, ``c_proj``)."""

LLAMA_FAMILY = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
"""Attention classes converted as Llama's (``q_proj``/``k_proj``/``v_proj``/``o_proj``, RoPE
by the family's own ``apply_rotary_pos_emb``, grouped KV heads, Qwen3's ``k_norm``). These are
the classes the tests cover; a structural twin can be added to this set at the user's risk."""

_CONFIG_KEY = "aaren_converted"  # config attribute (saved in config.json): the converted names


# --------------------------------------------------------------------------- registration

def _attention_function(module, query, key, value, attention_mask, **kwargs):
    """Registered as ``AttentionInterface["aaren"]`` so that HF accepts the name. A function
    there receives queries computed by the original module and keys/values its cache has
    already stored: it cannot give Aaren's learned queries or its constant-size state."""
    raise RuntimeError(
        f"attn_implementation='aaren' needs the attention modules converted by "
        f"aaren.hf.convert(model); {type(module).__name__} (layer "
        f"{getattr(module, 'layer_idx', '?')}) is not converted (a model saved after "
        f"aaren.hf.convert loads with aaren.hf.from_pretrained(cls, path), not "
        f"cls.from_pretrained(path))")


def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=causal_mask_function, attention_mask: Optional[Tensor] = None,
                  **kwargs) -> Optional[Tensor]:
    """Registered as ``AttentionMaskInterface["aaren"]``: what ``create_causal_mask`` gives a
    converted model's layers. ``attention_mask`` is HF's 2D mask over the cached and current
    tokens ([B, past + N], True = a real token); Aaren needs only its last ``q_length``
    columns (earlier tokens are already in the state). Returns None when nothing is padded.
    Raises ValueError for any pattern other than causal (packed sequences, overlays)."""
    if mask_function is not causal_mask_function:
        raise ValueError(
            "Aaren is causal attention over each sequence's own tokens; this model asked for "
            "another mask pattern (packed sequences in one row, a bidirectional block or a "
            "custom overlay), which a prefix scan cannot express. Pad the sequences instead.")
    if attention_mask is None:
        return None
    current = attention_mask[:, -q_length:].to(torch.bool)
    if current.shape != (batch_size, q_length):
        raise ValueError(f"Aaren: attention_mask of shape {list(attention_mask.shape)} does not "
                         f"cover the {q_length} current tokens of {batch_size} sequences")
    # "Nothing padded" is read from the mask's values: not while torch.compile traces, where
    # it would be a data-dependent branch (a graph break, an error under fullgraph); the mask
    # is then passed on as it is (all True masks nothing), as HF's own masks do under tracing.
    if not torch.compiler.is_compiling() and bool(current.all()):
        return None
    return current


def register() -> None:
    """Registers "aaren" with ``AttentionInterface`` and ``AttentionMaskInterface``.
    Idempotent (the same functions each time); ``convert`` calls it."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_function)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)


register()


# --------------------------------------------------------------------------- the cache

class AarenLayer(CacheLayerMixin):
    """One layer's Aaren state in a ``transformers`` ``Cache``: ``lse [B, H]`` and
    ``out [B, H, D]`` (float64; docs/design.md, "The state"), plus the number of tokens seen
    (HF's ``get_seq_length``, used by ``generate`` for positions and masks). Its size does
    not depend on the number of tokens. It stores no keys or values: ``update`` raises.
    A state cannot drop tokens, so ``crop`` (assisted decoding's rollback) raises."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.lse: Optional[Tensor] = None
        self.out: Optional[Tensor] = None
        self.seen_tokens = 0

    def __repr__(self) -> str:
        shape = None if self.out is None else list(self.out.shape)
        return f"AarenLayer(tokens={self.seen_tokens}, out={shape})"

    @property
    def state(self) -> Optional[Tuple[Tensor, Tensor]]:
        """``(lse, out)``, or None before the first token."""
        return None if self.lse is None else (self.lse, self.out)

    def set_state(self, state: Tuple[Tensor, Tensor], new_tokens: int) -> None:
        self.lse, self.out = state
        self.seen_tokens += int(new_tokens)
        self.is_initialized = True

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (0 before the first token)."""
        if self.lse is None:
            return 0
        return self.lse.numel() * self.lse.element_size() + self.out.numel() * self.out.element_size()

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass  # the state is created by the first scan

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise RuntimeError(
            "AarenLayer stores an (lse, out) state, not keys and values: its attention module "
            "must be converted by aaren.hf.convert (an unconverted attention module called "
            "Cache.update on it)")

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.lse = self.out = None
        self.seen_tokens = 0
        self.is_initialized = False

    def offload(self) -> None:
        if self.lse is not None:
            self.device = self.lse.device
            self.lse, self.out = self.lse.to("cpu"), self.out.to("cpu")

    def prefetch(self) -> None:
        if self.lse is not None and self.lse.device != getattr(self, "device", self.lse.device):
            self.lse, self.out = self.lse.to(self.device), self.out.to(self.device)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: row i becomes row ``beam_idx[i]``."""
        if self.lse is not None:
            index = beam_idx.to(self.lse.device)
            self.lse, self.out = self.lse.index_select(0, index), self.out.index_select(0, index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.lse is not None:
            self.lse = self.lse.repeat_interleave(repeats, dim=0)
            self.out = self.out.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.lse is not None:
            self.lse, self.out = self.lse[indices], self.out[indices]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise ValueError(
            "Aaren's state cannot drop tokens (it is a running softmax over all of them): "
            "assisted/speculative decoding and other rollbacks are not supported")


class AarenCache(Cache):
    """A ``transformers`` ``Cache`` of ``AarenLayer`` s, one ``(lse, out)`` state per layer.

    ``AarenCache(config)`` makes one layer per ``config.num_hidden_layers`` (of the text
    config); ``AarenCache()`` adds layers as the model reaches them. Pass it as
    ``past_key_values`` to ``generate`` or to a forward with ``use_cache=True``.
    """

    def __init__(self, config=None) -> None:
        if config is not None:
            layers = config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[AarenLayer() for _ in range(layers)])
        else:
            super().__init__(layer_class_to_replicate=AarenLayer)

    @property
    def states(self) -> List[Optional[Tuple[Tensor, Tensor]]]:
        """Each layer's ``(lse, out)`` (None for a layer not reached yet)."""
        return [getattr(layer, "state", None) for layer in self.layers]

    def state_bytes(self) -> int:
        """Bytes held by every layer's state."""
        return cache_bytes(self)


def cache_bytes(cache: Cache) -> int:
    """Bytes held by a ``transformers`` cache: Aaren states, or keys and values (a
    ``DynamicCache``'s), summed over layers."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, AarenLayer):
            total += layer.nbytes
            continue
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _layer_in(cache, layer_idx: int) -> AarenLayer:
    """The ``AarenLayer`` of ``cache`` for ``layer_idx``: an empty ``DynamicLayer`` (what a
    plain ``generate`` or ``use_cache=True`` creates) is replaced by one."""
    if isinstance(cache, EncoderDecoderCache):
        raise TypeError("Aaren is decoder-only self-attention: an EncoderDecoderCache is not supported")
    if not isinstance(cache, Cache):
        raise TypeError(f"past_key_values must be a transformers Cache (e.g. aaren.hf.AarenCache()), "
                        f"got {type(cache).__name__}")
    while len(cache.layers) <= layer_idx:
        cache.layers.append(AarenLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, AarenLayer):
        return layer
    if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
        cache.layers[layer_idx] = AarenLayer()
        return cache.layers[layer_idx]
    if type(layer) is DynamicLayer:
        what = f"a DynamicLayer already holding keys/values of {layer.get_seq_length()} tokens"
    else:
        what = f"a {type(layer).__name__} (static, sliding, quantized or offloaded key/value caches do not apply)"
    raise ValueError(
        f"layer {layer_idx} of the cache is {what}; a model converted by aaren.hf.convert keeps "
        f"an (lse, out) state per layer: pass aaren.hf.AarenCache() or no cache")


# --------------------------------------------------------------------------- the modules

class _AarenHFAttention(nn.Module):
    """Aaren in place of a ``transformers`` attention module (family subclasses supply the
    keys, values and output projection). Per head h, token i's score is
    ``scaling * q_h . k_{i, g(h)}`` with ``q_h`` learned and ``g(h) = h // (H / H_kv)`` the
    key/value head of h's group; the output for token k is softmax attention of ``q_h`` over
    tokens 1..k, computed by ``aaren.scan`` (several tokens) or ``aaren.step`` (one token
    after a state), continuing from the layer's state in ``past_key_values``.

    ``forward(hidden_states [B, N, E], attention_mask=None | [B, N] bool, past_key_values=None,
    ...) -> (output [B, N, E], None)`` (no attention weights exist)."""

    is_causal = True

    def _init_common(self, source: nn.Module, config, num_heads: int, num_kv_heads: int,
                     head_dim: int, scaling: float, dropout: float, dtype, device) -> None:
        self.config = config
        self.layer_idx = source.layer_idx
        self.num_heads = num_heads
        self.num_key_value_heads = num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        # As aaren.convert: a fresh learned query per head, N(0, 1/2) (docs/modules.md).
        self.query = nn.Parameter(torch.empty(num_heads, head_dim, dtype=dtype, device=device))
        init_learned_query_(self.query)
        self.query.requires_grad_(any(p.requires_grad for p in source.parameters()))

    def _keys_values(self, hidden_states: Tensor, position_embeddings) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _project_out(self, attn: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, hidden_states: Tensor, past_key_values=None, attention_mask=None,
                position_embeddings=None, **kwargs) -> Tuple[Tensor, None]:
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("Aaren is self-attention: encoder_hidden_states are not supported")
        batch, n = hidden_states.shape[:2]
        keys, values = self._keys_values(hidden_states, position_embeddings)  # [B, N, Hkv, D]
        q = self.query.to(keys.dtype).view(self.num_key_value_heads, self.num_key_value_groups,
                                           self.head_dim)
        scores = torch.einsum("bnkd,kgd->bnkg", keys, q).reshape(batch, n, self.num_heads)
        scores = scores * self.scaling
        if self.num_key_value_groups > 1:
            values = values.repeat_interleave(self.num_key_value_groups, dim=2)
        values = drop_token_contributions(values, self.dropout, self.training)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, n):
                raise ValueError(
                    f"Aaren: expected a padding mask [B, N] = [{batch}, {n}] from the 'aaren' "
                    f"attention implementation, got a mask of shape {list(attention_mask.shape)} "
                    f"(prepared 4D masks cannot be expressed by a scan; pass the 2D attention_mask)")
            scores = scores.masked_fill(~attention_mask.to(torch.bool).unsqueeze(-1), float("-inf"))
        layer = None if past_key_values is None else _layer_in(past_key_values, self.layer_idx)
        state = None if layer is None else layer.state
        if state is not None and state[0].size(0) != batch:
            raise ValueError(
                f"Aaren (layer {self.layer_idx}): the cache holds the state of a batch of "
                f"{state[0].size(0)} after {layer.seen_tokens} tokens, and this call has a batch "
                f"of {batch}: use a new AarenCache for a new batch (a cache continues the "
                f"sequences it has seen)")
        if n == 1 and state is not None:
            out, new_state = _step(scores[:, 0], values[:, 0], state)
            out = out.unsqueeze(1)
        else:
            out, new_state = _scan(scores, values, state)
        if layer is not None:
            layer.set_state(new_state, n)
        return self._project_out(out.reshape(batch, n, self.num_heads * self.head_dim)), None


class AarenGPT2Attention(_AarenHFAttention):
    """Aaren for ``GPT2Attention`` / ``DecisionTransformerGPT2Attention``: ``k_proj`` and
    ``v_proj`` (``nn.Linear``) hold the key and value columns of ``c_attn``; ``c_proj`` and
    ``resid_dropout`` are the source's; the scaling is the source's ``scaling`` (1/sqrt(D),
    divided by layer_idx + 1 when ``scale_attn_by_inverse_layer_idx``); ``attn_pdrop`` drops
    whole token contributions (the scan's counterpart of dropout on attention weights)."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        e, h = source.embed_dim, source.num_heads
        weight, bias = source.c_attn.weight, source.c_attn.bias  # Conv1D: y = x @ W + b, W [E, 3E]
        self._init_common(source, source.config, h, h, e // h, source.scaling,
                          source.attn_dropout.p, weight.dtype, weight.device)
        self.embed_dim = e
        self.k_proj = nn.Linear(e, e, dtype=weight.dtype, device=weight.device)
        self.v_proj = nn.Linear(e, e, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.k_proj.weight.copy_(weight[:, e:2 * e].t())
            self.k_proj.bias.copy_(bias[e:2 * e])
            self.v_proj.weight.copy_(weight[:, 2 * e:].t())
            self.v_proj.bias.copy_(bias[2 * e:])
        for p in (self.k_proj.weight, self.v_proj.weight):
            p.requires_grad_(weight.requires_grad)
        for p in (self.k_proj.bias, self.v_proj.bias):
            p.requires_grad_(bias.requires_grad)
        self.c_proj = copy.deepcopy(source.c_proj)
        self.resid_dropout = copy.deepcopy(source.resid_dropout)
        self.train(source.training)

    def _keys_values(self, hidden_states, position_embeddings):
        shape = (*hidden_states.shape[:2], self.num_heads, self.head_dim)
        return self.k_proj(hidden_states).view(shape), self.v_proj(hidden_states).view(shape)

    def _project_out(self, attn):
        return self.resid_dropout(self.c_proj(attn))


class AarenLlamaAttention(_AarenHFAttention):
    """Aaren for Llama-family attention (``LLAMA_FAMILY``): ``k_proj``, ``v_proj``, ``o_proj``
    (and Qwen3's ``k_norm``) are the source's; the query projection (and ``q_norm``) is
    dropped. Keys get the family's RoPE (``apply_rotary_pos_emb`` of the source's module,
    from the model's ``position_embeddings``): a token's score depends on that token alone,
    so positions stay exact in a scan. H query heads share H_kv key/value heads by groups."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        config = source.config
        weight = source.k_proj.weight
        num_heads = config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        self._init_common(source, config, num_heads, num_kv, source.head_dim, source.scaling,
                          getattr(source, "attention_dropout", 0.0), weight.dtype, weight.device)
        self.k_proj = copy.deepcopy(source.k_proj)
        self.v_proj = copy.deepcopy(source.v_proj)
        self.o_proj = copy.deepcopy(source.o_proj)
        self.k_norm = copy.deepcopy(source.k_norm) if hasattr(source, "k_norm") else None
        # The family's own RoPE function (Llama's, Mistral's, Qwen's: the same formula today).
        self._rope = sys.modules[type(source).__module__].apply_rotary_pos_emb
        self.train(source.training)

    def _keys_values(self, hidden_states, position_embeddings):
        if position_embeddings is None:
            raise ValueError("Aaren (Llama family): position_embeddings (cos, sin) are required")
        shape = (*hidden_states.shape[:2], -1, self.head_dim)
        keys = self.k_proj(hidden_states).view(shape)
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        cos, sin = position_embeddings
        keys = self._rope(keys, keys, cos, sin, unsqueeze_dim=2)[1]  # [B, N, Hkv, D] layout
        return keys, self.v_proj(hidden_states).view(shape)

    def _project_out(self, attn):
        return self.o_proj(attn)


# --------------------------------------------------------------------------- convert

def _refusal(name: str, module: nn.Module, config) -> Optional[str]:
    """Why ``module`` cannot become Aaren, or None when it can."""
    cls = type(module).__name__
    if cls in GPT2_FAMILY:
        if getattr(module, "is_cross_attention", False):
            return (f"{name} ({cls}) is cross-attention: it attends over encoder states, "
                    f"and Aaren attends over its own input only")
        return None
    if cls in LLAMA_FAMILY:
        window = getattr(module, "sliding_window", None) if hasattr(module, "sliding_window") \
            else getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        kind = layer_types[module.layer_idx] if layer_types else "full_attention"
        if window is not None or kind != "full_attention":
            return (f"{name} ({cls}) is a {kind if kind != 'full_attention' else 'sliding-window'} "
                    f"layer (window {window}): Aaren attends over every earlier token and "
                    f"cannot forget tokens that leave a window")
        if not getattr(module, "is_causal", True) or not getattr(config, "is_causal", True):
            return f"{name} ({cls}) is bidirectional (is_causal=False): Aaren is causal"
        return None
    if getattr(module, "is_causal", None) is False:
        return (f"{name} ({cls}) is bidirectional attention (an encoder: every token sees "
                f"every other): Aaren is causal by construction")
    return f"{name} is a {cls}, not one of the supported {sorted(GPT2_FAMILY | LLAMA_FAMILY)}"


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Attention") and not isinstance(module, _AarenHFAttention)


def convert(model: nn.Module, names: Optional[Iterable[str]] = None) -> nn.Module:
    """Replaces the causal self-attention of a ``transformers`` model by Aaren, in place.

    Supported: ``GPT2_FAMILY`` (GPT-2, DecisionTransformer) and ``LLAMA_FAMILY`` (Llama,
    Mistral, Qwen2, Qwen3) attention modules. Each keeps its key, value and output projections
    (copied; GPT-2's fused ``c_attn`` is split), HF's per-layer scaling, RoPE on keys and
    grouped KV heads; the query projection is dropped and a learned query per head
    ``[H, head_dim]`` (N(0, 1/2), as ``aaren.convert``) takes its place, so the model needs
    training. Every remaining parameter is used (no unused parameters for DDP).

    ``names``: qualified module names to convert (default: every supported attention module).
    Sets ``config._attn_implementation = "aaren"`` (every config in the model; the model's
    own config also saves it as ``attn_implementation``), stores the
    converted names in ``config.aaren_converted`` (saved by ``save_pretrained``; see
    ``from_pretrained``) and ``model.aaren_converted``, and marks the model stateful so that
    ``generate`` refuses assisted decoding. Returns ``model``.

    Raises TypeError for ``names`` given as one string, and ValueError, before changing
    anything, for: encoder-decoder models; cross-attention;
    bidirectional attention (e.g. BERT's encoder); sliding-window or chunked layers; any
    other attention class; ``names`` that are not supported attention modules; a model with
    no supported attention.
    """
    register()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__} is an encoder-decoder model: its encoder is "
                         f"bidirectional and its decoder uses cross-attention; Aaren replaces "
                         f"only decoder-only causal self-attention")
    if isinstance(names, str):  # list("a.b") would be its characters
        raise TypeError(f"aaren.hf.convert: names must be a list of module names, got the "
                        f"string {names!r} (write names=[{names!r}])")
    wanted = None if names is None else list(names)
    modules = dict(model.named_modules())
    targets: List[Tuple[str, nn.Module]] = []
    problems: List[str] = []
    if wanted is not None:
        missing = [n for n in wanted if n not in modules]
        if missing:
            raise ValueError(f"aaren.hf.convert: no modules named {missing} in the model")
        candidates = [(n, modules[n]) for n in wanted]
    else:
        candidates = [(n, m) for n, m in modules.items() if _looks_like_attention(m)]
    candidate_names = [n for n, _ in candidates]
    for name, module in candidates:
        if isinstance(module, _AarenHFAttention):
            continue  # converted already
        if (wanted is None and type(module).__name__ not in GPT2_FAMILY | LLAMA_FAMILY
                and any(other.startswith(name + ".") for other in candidate_names)):
            continue  # a wrapper (e.g. BertAttention): the attention inside it says why
        reason = _refusal(name, module, getattr(module, "config", config))
        if reason is None:
            targets.append((name, module))
        else:
            problems.append(reason)
    if problems:
        raise ValueError("aaren.hf.convert: cannot convert this model:\n  " + "\n  ".join(problems))
    if not targets:
        already = [n for n, m in modules.items() if isinstance(m, _AarenHFAttention)]
        if already and wanted is None:
            return model
        raise ValueError(f"aaren.hf.convert: found no attention module to convert in "
                         f"{type(model).__name__} (supported: {sorted(GPT2_FAMILY | LLAMA_FAMILY)})")
    new_modules = {}
    for name, module in targets:  # build all first: nothing changes if one fails
        family = AarenGPT2Attention if type(module).__name__ in GPT2_FAMILY else AarenLlamaAttention
        new_modules[name] = family(module)
    for name, new in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    converted = sorted(new_modules)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._attn_implementation = ATTN_IMPLEMENTATION
            module._is_stateful = True  # generate() refuses assisted decoding for stateful models
    if config is not None:  # names relative to `model`, for from_pretrained(type(model), ...)
        previous = getattr(config, _CONFIG_KEY, None) or []
        setattr(config, _CONFIG_KEY, sorted(set(previous) | set(converted)))
        # Saved as "attn_implementation" in config.json, which transformers reads back on
        # load: a plain cls.from_pretrained(path) then builds the unconverted attention with
        # implementation "aaren", whose registered function raises at the first forward (or
        # transformers refuses the name where aaren.hf is not imported), instead of silently
        # running a model with a random q_proj.
        config.attn_implementation = ATTN_IMPLEMENTATION
    previous = getattr(model, "aaren_converted", None)
    model.aaren_converted = (list(previous) if isinstance(previous, list) else []) + converted
    _log.info("aaren.hf.convert replaced %d attention modules: %s", len(converted), ", ".join(converted))
    return model


# --------------------------------------------------------------------------- save / load

def from_pretrained(cls, path: str, **kwargs) -> nn.Module:
    """Loads a converted model saved with ``model.save_pretrained(path)``.

    ``cls`` is the model class (e.g. ``GPT2LMHeadModel``); ``kwargs`` go to
    ``cls.config_class.from_pretrained`` (e.g. nothing, or ``trust_remote_code``). The config
    names the converted modules (``aaren_converted``); the model is built from the config,
    converted, and its weights (``model.safetensors`` or a sharded index) loaded strictly:
    every saved tensor must be used and every parameter loaded, except weights the model ties
    (e.g. ``lm_head.weight`` to the embeddings), which are tied again. Returns the model in
    eval mode, as ``transformers`` does. Raises ValueError for a checkpoint of an unconverted
    model or one whose tensors do not match.

    (``cls.from_pretrained`` itself would rebuild the unconverted architecture, HF configs
    not recording a custom attention module; the saved config's ``attn_implementation``
    "aaren" makes that model raise at its first forward, saying to use this function.)
    """
    from safetensors.torch import load_file

    config = cls.config_class.from_pretrained(path, **kwargs)
    names = getattr(config, _CONFIG_KEY, None)
    if not names:
        raise ValueError(f"{path}: the config has no '{_CONFIG_KEY}': not a model saved after "
                         f"aaren.hf.convert (load it with {cls.__name__}.from_pretrained)")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = cls(config)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    convert(model, names)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         f"(save with save_pretrained's default safe_serialization)")
    state: Dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(os.path.join(path, file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not match the converted "
                         f"{cls.__name__}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    return model


# --------------------------------------------------------------------------- Decision Transformer

class DecisionTransformerStream:
    """Steps a converted ``DecisionTransformerModel`` one timestep at a time with a state of
    constant size (an ``AarenCache``), giving what its full forward gives over the trajectory
    so far (the paper's RL setting: Feng et al., 2024, section 4.2).

    Per timestep t: ``act(return_to_go [B, 1], state [B, state_dim], timestep [B])`` feeds the
    tokens R_t and s_t and returns the predicted action ``[B, act_dim]`` (the full forward's
    ``action_preds[:, t]``); then ``observe(action [B, act_dim])`` feeds a_t and returns
    ``(state_pred [B, state_dim], return_pred [B, 1])`` (``state_preds[:, t]``,
    ``return_preds[:, t]``). Calls must alternate, starting with ``act``.
    """

    def __init__(self, model: nn.Module) -> None:
        if type(model).__name__ != "DecisionTransformerModel":
            raise TypeError(f"expected a DecisionTransformerModel, got {type(model).__name__}")
        if not any(isinstance(m, AarenGPT2Attention) for m in model.modules()):
            raise ValueError("convert the model first: aaren.hf.convert(model)")
        self.model = model
        self.cache = AarenCache(model.config)
        self._time: Optional[Tensor] = None  # the current timestep's embedding, between act and observe

    def _encode(self, tokens: Tensor) -> Tensor:
        """tokens [B, k, E] (before embed_ln) -> the encoder's outputs [B, k, E]."""
        tokens = self.model.embed_ln(tokens)
        positions = torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return self.model.encoder(inputs_embeds=tokens, position_ids=positions,
                                  past_key_values=self.cache, use_cache=True).last_hidden_state

    def act(self, return_to_go: Tensor, state: Tensor, timestep: Tensor) -> Tensor:
        if self._time is not None:
            raise RuntimeError("DecisionTransformerStream: call observe(action) before the next act")
        m = self.model
        self._time = m.embed_timestep(timestep)  # [B, E]
        tokens = torch.stack([m.embed_return(return_to_go) + self._time,
                              m.embed_state(state) + self._time], dim=1)
        hidden = self._encode(tokens)
        return m.predict_action(hidden[:, 1])

    def observe(self, action: Tensor) -> Tuple[Tensor, Tensor]:
        if self._time is None:
            raise RuntimeError("DecisionTransformerStream: call act(...) first")
        m = self.model
        hidden = self._encode((m.embed_action(action) + self._time).unsqueeze(1))[:, 0]
        self._time = None
        return m.predict_state(hidden), m.predict_return(hidden)
