"""nn.Module layers built on the scan.

- `Aaren`: a drop-in replacement for a causal `torch.nn.MultiheadAttention` used as
  self-attention (same constructor, call signature, shapes and `batch_first` convention),
  with one learned query per head, plus constant-memory streaming (`step`, `prefill`).
- `AarenEncoderLayer`, `AarenEncoder`: the `nn.TransformerEncoderLayer` /
  `nn.TransformerEncoder` stack with `Aaren` as self-attention, with `forward` (parallel),
  `prefill` and `step` (a list of per-layer states).
(`aaren.convert`, which swaps them into existing models, is in `conversion.py`.)

See docs/modules.md for the design (initialization, parameter count, masks, dropout,
differences from attention).
"""
import copy
import math
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import scan as _scan
from .functional import scan_varlen as _scan_varlen
from .functional import step as _step
from .functional import _check_state, _check_tensor, _check_token
from .functional import empty_state as _empty_state
from . import _fast_step

__all__ = ["Aaren", "AarenEncoderLayer", "AarenEncoder"]

def init_learned_query_(query: Tensor) -> Tensor:
    """Aaren's initialization of a learned query [H, head_dim], in place: N(0, 1/2) per entry
    (docs/modules.md, "Parameters, initialization, dtype/device"). Returns ``query``."""
    return nn.init.normal_(query, std=math.sqrt(0.5))


def drop_token_contributions(values: Tensor, p: float, training: bool) -> Tensor:
    """Dropout of whole token contributions, the scan's counterpart of dropout on attention
    weights: values [..., H, hd] * mask [..., H, 1] (per batch, token and head), scaled by
    1 / (1 - p) as ``F.dropout``; the identity unless training and p > 0."""
    if not training or p == 0.0:
        return values
    keep = F.dropout(torch.ones_like(values[..., :1]), p=p, training=True)
    return values * keep


def _masked_at_or_below() -> float:
    """A float attn_mask entry at or below this value (or -inf) masks its token.

    -1e4 is what old BERT-style code writes (``(1 - mask) * -10000.0``), and every usual
    way of writing "masked" reaches it: -1e9, ``torch.finfo(dtype).min`` (float16's is
    -65504), -inf. It lies far below any additive bias (relative-position biases are of
    order 10; ALiBi-style distance biases are also non-zero below the diagonal, which this
    check rejects anyway), and ``exp(-1e4)`` underflows to 0 in every floating dtype, so
    attention itself gives such a token exactly zero weight (in float64, unless its score
    exceeded the visible ones' by over 9000). The comparison is made in the mask's dtype,
    so -1e4 written in bfloat16 (rounded to -9984) counts.
    (A function rather than a global: TorchScript inlines it.)"""
    return -1e4


def _not_causal_message() -> str:
    return ("Aaren is causal by construction (token k sees tokens 1..k): attn_mask must be "
            "None or the causal mask (bool: True above the diagonal and False elsewhere; "
            "float: 0 on and below the diagonal and, above it, -inf or any value <= -1e4 "
            "such as -1e9 or torch.finfo(dtype).min). Any other attention pattern, or an "
            "additive bias, cannot be expressed; use key_padding_mask to mask tokens.")


def _key_padding_to_scores(scores: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """scores [B, N, H]; key_padding_mask [B, N]: bool (True = ignore) or float (added)."""
    if key_padding_mask is None:
        return scores
    if key_padding_mask.device != scores.device:
        raise ValueError(f"Aaren: key_padding_mask must be on the input's device "
                         f"({scores.device}), got {key_padding_mask.device}")
    if key_padding_mask.dim() != 2 or key_padding_mask.size(0) != scores.size(0) or \
            key_padding_mask.size(1) != scores.size(1):
        raise ValueError(
            f"Aaren: key_padding_mask must have shape [batch, seq] = "
            f"[{scores.size(0)}, {scores.size(1)}] (or [seq] for unbatched input), got "
            f"{list(key_padding_mask.shape)}")
    if key_padding_mask.dtype == torch.bool:
        return scores.masked_fill(key_padding_mask.unsqueeze(-1), float("-inf"))
    if not torch.is_floating_point(key_padding_mask):
        raise TypeError(
            f"Aaren: key_padding_mask must be bool or floating point, got {key_padding_mask.dtype}")
    return scores + key_padding_mask.unsqueeze(-1).to(scores.dtype)


def _check_causal_mask(attn_mask: Tensor, n: int) -> None:
    """Raises unless attn_mask ([N, N] or [batch * heads, N, N]) is the causal mask."""
    if (attn_mask.dim() != 2 and attn_mask.dim() != 3) or attn_mask.size(-1) != n or \
            attn_mask.size(-2) != n:
        raise ValueError(
            f"{_not_causal_message()} Got an attn_mask of shape {list(attn_mask.shape)} for a sequence "
            f"of {n} tokens.")
    later = torch.ones(n, n, dtype=torch.bool, device=attn_mask.device).triu(1)
    if attn_mask.dtype == torch.bool:
        ok = (attn_mask == later).all()
    elif torch.is_floating_point(attn_mask):
        # 0 on and below the diagonal; masked (-inf or <= the threshold) above it.
        # NaN fails both comparisons. One elementwise pass, as for the bool mask.
        ok = torch.where(later, attn_mask <= _masked_at_or_below(), attn_mask == 0).all()
    else:
        raise TypeError(f"Aaren: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask.device.type == "meta":  # no values to check (shape inference)
        return
    if torch.jit.is_scripting():
        if not bool(ok):
            raise ValueError(_not_causal_message())
    elif torch.compiler.is_compiling():
        # A data-dependent check: an assertion inside the graph (no graph break).
        torch._assert_async(ok, _not_causal_message())
    elif not bool(ok):
        raise ValueError(_not_causal_message())


class Aaren(nn.Module):
    r"""Attention as a many-to-many RNN, with the interface of ``nn.MultiheadAttention``.

    Each head h has a learned query ``q_h`` (the paper's query token). Token i gives a key
    ``k_i = W_k x_i + b_k`` and a value ``v_i = W_v x_i + b_v`` (split into heads as in
    attention); the output for token k is, per head, softmax attention of ``q_h`` over tokens
    1..k with scores ``q_h . k_{i,h} / sqrt(head_dim)``, then the output projection ``W_o``.
    Aaren is therefore causal by construction, and computed by a parallel prefix scan
    (``aaren.scan``) in ``forward``/``prefill`` and one token at a time (``aaren.step``) in
    ``step``, with a state of constant size.

    Args:
        embed_dim: total dimension E of the model.
        num_heads: number of heads H; ``head_dim = E // H``.
        dropout: drop probability for whole token contributions (per batch, token and head),
            the scan's counterpart of dropout on attention weights; training only.
        bias: whether the key, value and output projections have biases.
        batch_first: inputs and outputs are ``[batch, seq, E]`` if True, ``[seq, batch, E]``
            otherwise (as ``nn.MultiheadAttention``; unbatched ``[seq, E]`` inputs work too).
        device, dtype: of the parameters, as for ``nn.Linear``.

    Parameters: ``query`` [H, head_dim], ``k_proj``, ``v_proj``, ``out_proj`` (``nn.Linear``
    E -> E). That is ``3 E^2 + E`` (+ ``3 E`` biases) parameters: an ``nn.MultiheadAttention``
    of the same size has ``4 E^2`` (+ ``4 E``). Initialization: ``k_proj``/``v_proj`` weights
    uniform as ``nn.MultiheadAttention``'s ``in_proj_weight`` (Xavier over the fused
    [3E, E] matrix: U(-a, a), a = sqrt(3 / (2E))), ``out_proj`` as ``nn.Linear``, biases 0,
    ``query`` ~ N(0, 1/2) (the distribution of attention's queries ``W_q x`` at
    initialization for unit-variance inputs, so scores start at the same scale).

    The key projection is folded into the query: the scores are computed by a [H, E]
    projection ``(q_h^T W_{k,h}) / sqrt(head_dim)`` built at each call, so no [B, N, E] key
    tensor is formed and ``k_proj`` is never called as a module (hooks on it do not fire);
    gradients reach ``query`` and ``k_proj`` through that product. ``step`` stacks it on
    ``v_proj`` ([H + E, E]: one matrix-vector product per token) and, in eval mode with
    autograd off, keeps that matrix between calls until a parameter it comes from changes
    (``v_proj`` is then not called as a module in ``step``: that is done only when it is a
    plain ``nn.Linear`` without hooks; anything else is called as before).

    Differences from ``nn.MultiheadAttention``: the ``query`` argument only fixes shapes
    (it must have the shape of ``key``; queries are learned); ``key`` gives the scores and
    ``value`` the values; no attention weights are returned (``need_weights`` and
    ``average_attn_weights`` are accepted and ignored; the second output is None);
    ``attn_mask`` must be None or the causal mask (anything else raises); a token whose
    prefix is entirely masked gets output 0 before ``out_proj`` (attention gives NaN).
    ``in_proj_weight`` / ``in_proj_bias`` are empty placeholder buffers (not parameters,
    not in the state dict) and ``_qkv_same_embed_dim`` is False, so that code written for
    ``nn.MultiheadAttention`` (the inference fast paths of ``nn.TransformerEncoderLayer``
    and ``nn.TransformerEncoder``) finds no fused projection and calls ``forward``.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got "
                             f"embed_dim={embed_dim} and num_heads={num_heads}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a probability, got {dropout}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = embed_dim
        self.vdim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        # What nn.MultiheadAttention's users inspect: no fused projection, no extra tokens.
        self._qkv_same_embed_dim = False
        self.bias_k = None
        self.bias_v = None
        self.add_zero_attn = False
        self.register_buffer("in_proj_weight", torch.empty(0, **factory_kwargs), persistent=False)
        self.register_buffer("in_proj_bias", torch.empty(0, **factory_kwargs), persistent=False)

        self.query = nn.Parameter(torch.empty(num_heads, self.head_dim, **factory_kwargs))
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialization described in the class docstring."""
        bound = math.sqrt(6.0 / (4 * self.embed_dim))  # xavier_uniform_ of a [3E, E] matrix
        nn.init.uniform_(self.k_proj.weight, -bound, bound)
        nn.init.uniform_(self.v_proj.weight, -bound, bound)
        self.out_proj.reset_parameters()
        for linear in (self.k_proj, self.v_proj, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        init_learned_query_(self.query)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"bias={self.k_proj.bias is not None}, batch_first={self.batch_first}")

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> "Aaren":
        """An Aaren with the size, ``batch_first``, dropout, dtype, device and training mode
        of ``mha``, reusing (copying) its key, value and output projections; the query
        projection is dropped and the learned query freshly initialized.

        ``requires_grad``: each copied parameter keeps its source's flag (``k_proj`` and
        ``v_proj`` weights from ``in_proj_weight``, their biases from ``in_proj_bias``,
        ``out_proj`` weight and bias from ``mha.out_proj``), so a partly frozen module
        (e.g. only ``out_proj`` trained) stays partly frozen. The new ``query`` is trainable
        unless no parameter of ``mha`` requires grad (the whole module was frozen)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError(
                f"cannot convert a MultiheadAttention with kdim={mha.kdim}, vdim={mha.vdim} != "
                f"embed_dim={mha.embed_dim}: it attends over another sequence, and Aaren is "
                f"self-attention (keys and values come from the input itself)")
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("cannot convert a MultiheadAttention with add_bias_kv or "
                             "add_zero_attn: Aaren has no extra key/value tokens")
        weight = mha.in_proj_weight
        has_bias = mha.in_proj_bias is not None
        module = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=has_bias,
                     batch_first=mha.batch_first, device=weight.device, dtype=weight.dtype)
        e = mha.embed_dim
        # (target, source): kdim == vdim == embed_dim (checked above), so the key and value
        # weights are slices of the fused in_proj_weight, never k_proj_weight/v_proj_weight.
        copies: List[Tuple[Tensor, Tensor]] = [
            (module.k_proj.weight, weight[e:2 * e]),
            (module.v_proj.weight, weight[2 * e:]),
            (module.out_proj.weight, mha.out_proj.weight),
        ]
        if has_bias:
            copies.append((module.k_proj.bias, mha.in_proj_bias[e:2 * e]))
            copies.append((module.v_proj.bias, mha.in_proj_bias[2 * e:]))
        if mha.out_proj.bias is not None and module.out_proj.bias is not None:
            copies.append((module.out_proj.bias, mha.out_proj.bias))
        copied = set()
        with torch.no_grad():
            for target, source in copies:
                target.copy_(source)
        for target, source in copies:  # a slice of a parameter has the parameter's flag
            target.requires_grad_(source.requires_grad)
            copied.add(id(target))
        # New parameters (the query; an out_proj bias the source lacks): trainable unless
        # the whole source module was frozen.
        trainable = any(p.requires_grad for p in mha.parameters())
        for p in module.parameters():
            if id(p) not in copied:
                p.requires_grad_(trainable)
        module.train(mha.training)
        return module

    # ---------------------------------------------------------------- internals

    def _score_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        """[H, E] weight (and [H] bias) with scores = x @ W^T + b = q_h . k_h / sqrt(hd)."""
        q = self.query * (self.head_dim ** -0.5)  # [H, hd]
        w_k = self.k_proj.weight.reshape(self.num_heads, self.head_dim, self.embed_dim)
        weight = torch.bmm(q.unsqueeze(1).to(w_k.dtype), w_k).squeeze(1)  # [H, E]
        bias: Optional[Tensor] = None
        b_k = self.k_proj.bias
        if b_k is not None:
            bias = (q.to(b_k.dtype) * b_k.reshape(self.num_heads, self.head_dim)).sum(-1)
        return weight, bias

    def _step_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The score and value projections of ``step`` as one: weight [H + E, E] (rows 0..H-1
        the folded score projection, rows H.. ``v_proj``'s) and bias [H + E] (None when
        neither projection has one), so one ``addmm`` gives a token's scores and values."""
        score_weight, score_bias = self._score_projection()
        v_weight = self.v_proj.weight
        weight = torch.cat([score_weight.to(v_weight.dtype), v_weight], 0)
        v_bias = self.v_proj.bias
        if score_bias is None and v_bias is None:
            return weight, None
        if score_bias is None:
            score_bias = torch.zeros(self.num_heads, dtype=weight.dtype, device=weight.device)
        if v_bias is None:
            v_bias = torch.zeros(self.embed_dim, dtype=weight.dtype, device=weight.device)
        return weight, torch.cat([score_bias.to(weight.dtype), v_bias.to(weight.dtype)], 0)

    @torch.jit.unused
    def _cached_step_projection(self) -> Tuple[Tensor, Optional[Tensor]]:
        """``_step_projection()``, kept between ``step`` calls while nothing can go stale
        (eval mode, autograd off; ``aaren._fast_step.cached_step_projection``)."""
        return _fast_step.cached_step_projection(self)

    def _drop_step_cache(self) -> None:
        _fast_step.drop_step_cache(self)

    def _apply(self, fn, recurse=True):
        self._drop_step_cache()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        self._drop_step_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_step_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        # Copies and pickles (copy.deepcopy, torch.save of the module) start without a cache.
        return _fast_step.without_step_cache(super().__getstate__())

    def _drop_tokens(self, values: Tensor) -> Tensor:
        return drop_token_contributions(values, self.dropout, self.training)

    def _attend(self, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                state: Optional[Tuple[Tensor, Tensor]], batch_first: bool
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """key, value: [B, N, E] (batch_first) or [N, B, E]; returns the output in the same
        layout and the state after the last token."""
        weight, bias = self._score_projection()
        scores = F.linear(key, weight, bias)  # [B, N, H] or [N, B, H]
        values = self.v_proj(value)
        values = values.view(values.size(0), values.size(1), self.num_heads, self.head_dim)
        if not batch_first:  # views with the last dimension contiguous: no copies
            scores = scores.transpose(0, 1)
            values = values.transpose(0, 1)
        values = self._drop_tokens(values)
        scores = _key_padding_to_scores(scores.to(values.dtype), key_padding_mask)
        if torch.jit.is_scripting():
            out, new_state = _scan(scores, values, state)  # out [B, N, H, hd], contiguous
        else:
            out, new_state = self._scan_in_python(scores, values, state)
        y = self.out_proj(out.flatten(2))
        if not batch_first:
            y = y.transpose(0, 1)
        return y, new_state

    def _attend_packed(self, key: Tensor, value: Tensor, cu_seqlens: Tensor,
                       max_seqlen: Optional[int], key_padding_mask: Optional[Tensor],
                       state: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """key, value: packed sequences [T, E] (sequence i the rows cu_seqlens[i]:cu_seqlens[i+1],
        ``aaren.scan_varlen``); returns the output [T, E] and the state after each sequence."""
        weight, bias = self._score_projection()
        scores = F.linear(key, weight, bias)  # [T, H]
        values = self.v_proj(value)
        values = self._drop_tokens(values.view(values.size(0), self.num_heads, self.head_dim))
        scores = scores.to(values.dtype)
        if key_padding_mask is not None:
            if key_padding_mask.dim() != 1 or key_padding_mask.size(0) != scores.size(0):
                raise ValueError(f"Aaren: with cu_seqlens, key_padding_mask must have shape [T] = "
                                 f"[{scores.size(0)}], got {list(key_padding_mask.shape)}")
            scores = _key_padding_to_scores(scores.unsqueeze(0), key_padding_mask.unsqueeze(0))[0]
        if torch.jit.is_scripting():
            out, new_state = _scan_varlen(scores, values, cu_seqlens, max_seqlen, state)
        else:
            out, new_state = self._scan_varlen_in_python(scores, values, cu_seqlens, max_seqlen,
                                                         state)
        return self.out_proj(out.flatten(1)), new_state

    @torch.jit.unused
    def _scan_varlen_in_python(self, scores: Tensor, values: Tensor, cu_seqlens: Tensor,
                               max_seqlen: Optional[int], state: Optional[Tuple[Tensor, Tensor]]
                               ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """`aaren.scan_varlen`, or `aaren.distributed.scan(..., cu_seqlens=...)` under
        `aaren.distributed.context_parallel`: this rank's tokens of the packed stream, with the
        global cu_seqlens."""
        parallel = self.__dict__.get("_context_parallel")
        if parallel is None:
            return _scan_varlen(scores, values, cu_seqlens, max_seqlen, state)
        from ._context_parallel import scan as _context_parallel_scan
        return _context_parallel_scan(scores, values, state, group=parallel[0],
                                      cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    @torch.jit.unused
    def _scan_in_python(self, scores: Tensor, values: Tensor,
                        state: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """`aaren.scan`, or `aaren.distributed.scan` over the sequence-parallel group that
        `aaren.distributed.context_parallel` set (docs/distributed.md)."""
        parallel = self.__dict__.get("_context_parallel")
        if parallel is None:
            return _scan(scores, values, state)
        # Imported at first use: it loads torch.distributed, which `import aaren` need not.
        from ._context_parallel import scan as _context_parallel_scan
        return _context_parallel_scan(scores, values, state, group=parallel[0])

    @torch.jit.unused
    def _forward_nested(self, query: Tensor, key: Tensor, value: Tensor,
                        key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]
                        ) -> Tuple[Tensor, Optional[Tensor]]:
        """Nested (ragged) batch_first input, as nn.TransformerEncoder's inference path
        builds from a padding mask: pad, mask the padding, run, and re-nest."""
        if not (query is key and key is value):
            raise ValueError("Aaren: nested tensor input must be self-attention "
                             "(query, key and value the same tensor)")
        if key_padding_mask is not None or attn_mask is not None:
            raise ValueError("Aaren: masks are not supported with nested tensor input "
                             "(the nesting already says which tokens exist)")
        if query.dim() != 3:
            raise ValueError(f"Aaren: expected a nested tensor [batch, *, E], got dim {query.dim()}")
        if query.layout == torch.jagged and query._ragged_idx == 1 and query._lengths is None:
            # A jagged tensor is packed already: its values [T, E] and offsets (cu_seqlens).
            packed, offsets = query.values(), query.offsets()
            y, _ = self._attend_packed(packed, packed, offsets, None, None, None)
            return torch.nested.nested_tensor_from_jagged(y, offsets), None
        # Strided (nn.TransformerEncoder's inference path builds one from a padding mask):
        # its sequences packed one after another, then the packed scan (no padding).
        pieces = list(query.unbind())
        lengths = [int(t.size(0)) for t in pieces]
        packed = torch.cat(pieces)
        offsets = torch.tensor([0] + lengths, device=packed.device).cumsum(0)
        y, _ = self._attend_packed(packed, packed, offsets, max(lengths, default=0), None, None)
        return torch.nested.as_nested_tensor(list(y.split(lengths)), layout=query.layout), None

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        """Exists only so that TorchScript can compile ``nn.TransformerEncoderLayer``'s fused
        inference path (which Aaren never takes: ``_qkv_same_embed_dim`` is False)."""
        raise RuntimeError("Aaren has no fused attention kernel; merge_masks is not used")

    @torch.jit.unused
    def _check_input_dtype(self, x: Tensor, name: str) -> None:
        """The input in the dtype of the projections' weights (under autocast any: F.linear
        casts): an error naming the input, not F.linear's 'mat1 and mat2 must have the
        same dtype'."""
        weight = getattr(self.k_proj, "weight", None)
        if not isinstance(weight, Tensor) or x.dtype == weight.dtype or \
                not torch.is_floating_point(weight) or torch.is_autocast_enabled(x.device.type):
            return
        # RuntimeError, as F.linear's (and nn.MultiheadAttention's) error was.
        raise RuntimeError(f"Aaren: {name} must have the dtype of the module's parameters "
                        f"({weight.dtype}), got {x.dtype}")

    # ---------------------------------------------------------------- public API

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """As ``nn.MultiheadAttention.forward``; returns ``(attn_output, None)``.

        query: only fixes the shape (``[N, B, E]``, ``[B, N, E]`` if batch_first, or ``[N, E]``
        unbatched) and must have the shape of key and value. key: the tokens the scores
        come from; value: the tokens the values come from (both the input ``x`` in
        self-attention). key_padding_mask ``[B, N]`` (``[N]`` unbatched): bool, True = ignore
        the token, or float, added to its scores. attn_mask: None or the causal mask
        (``[N, N]`` or ``[B * H, N, N]``), else an error. is_causal, need_weights,
        average_attn_weights: accepted, no effect (Aaren is always causal and returns no
        weights).

        Packed sequences of different lengths (flash-attn's varlen layout): with
        ``cu_seqlens`` [N + 1] (int32 or int64, on the input's device), query, key and value
        are ``[T, E]``, sequence i the rows ``cu_seqlens[i]:cu_seqlens[i + 1]``, each attended
        on its own (``aaren.scan_varlen``; ``max_seqlen``, when given, at least the longest
        sequence); key_padding_mask is then ``[T]``. The output is ``[T, E]``. A nested tensor
        ``[B, *, E]`` (jagged or strided) is taken the same way, without padding.
        """
        if not torch.jit.is_scripting():
            if query.is_nested or key.is_nested or value.is_nested:
                if cu_seqlens is not None:
                    raise ValueError("Aaren: a nested tensor says its sequences itself: no cu_seqlens")
                return self._forward_nested(query, key, value, key_padding_mask, attn_mask)
        if cu_seqlens is not None:
            if query.dim() != 2 or query.shape != key.shape or key.shape != value.shape or \
                    query.size(-1) != self.embed_dim:
                raise ValueError(
                    f"Aaren: with cu_seqlens, query, key and value must be packed sequences "
                    f"[T, E] with E={self.embed_dim}, got {list(query.shape)}, {list(key.shape)} "
                    f"and {list(value.shape)}")
            if attn_mask is not None:
                raise ValueError("Aaren: with cu_seqlens, attn_mask must be None (each packed "
                                 "sequence is attended causally on its own)")
            return self._attend_packed(key, value, cu_seqlens, max_seqlen, key_padding_mask,
                                       None)[0], None
        if query.dim() not in (2, 3):
            raise ValueError(f"Aaren: expected query of dim 3 (batched) or 2 (unbatched), got "
                             f"shape {list(query.shape)}")
        if query.shape != key.shape or key.shape != value.shape:
            raise ValueError(
                f"Aaren is causal self-attention with learned queries: query (which only fixes "
                f"the output shape), key and value must have the same shape, got "
                f"{list(query.shape)}, {list(key.shape)} and {list(value.shape)}")
        if query.size(-1) != self.embed_dim:
            raise ValueError(f"Aaren: expected inputs with embed_dim={self.embed_dim} features, "
                             f"got {query.size(-1)}")
        is_batched = query.dim() == 3
        batch_first = self.batch_first
        if not is_batched:  # [N, E] -> [1, N, E]
            key = key.unsqueeze(0)
            value = value.unsqueeze(0)
            batch_first = True
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not torch.jit.is_scripting():
            self._check_input_dtype(key, "query, key and value")
        if attn_mask is not None:
            _check_causal_mask(attn_mask, key.size(1) if batch_first else key.size(0))
        y, _ = self._attend(key, value, key_padding_mask, None, batch_first)
        if not is_batched:
            y = y.squeeze(0)
        return y, None

    @torch.jit.export
    def prefill(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None,
                key_padding_mask: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """A chunk of tokens at once (parallel scan), continuing from ``state``.

        x: ``[B, N, E]`` if batch_first else ``[N, B, E]``; key_padding_mask ``[B, N]`` as in
        ``forward`` (a masked token leaves the state unchanged, so right-padded prompts of
        different lengths give each sequence its own state). Returns the outputs (same
        layout as x) and the state after the chunk: ``(lse [B, H], out [B, H, head_dim])``
        (both float64, whatever the module's dtype: see ``aaren.scan``), whose size does not
        depend on the number of tokens seen. ``state=None`` is the empty
        state (no tokens yet).
        """
        if not torch.jit.is_scripting():
            _check_tensor(x, "x", "Aaren.prefill")
            self._check_input_dtype(x, "x")
        if x.dim() != 3 or x.size(-1) != self.embed_dim:
            raise ValueError(f"Aaren.prefill: expected x of shape "
                             f"{'[B, N, E]' if self.batch_first else '[N, B, E]'} with "
                             f"E={self.embed_dim}, got {list(x.shape)}")
        return self._attend(x, x, key_padding_mask, state, self.batch_first)

    @torch.jit.export
    def step(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
             ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """One token, the RNN form: x ``[B, E]`` -> (y ``[B, E]``, new state).

        Running ``step`` over a sequence gives the outputs of ``forward`` over it; the state
        is as in ``prefill`` and its size never grows.

        Scores and values come from one product with the [H + E, E] stack of the folded
        score projection and ``v_proj``, and the whole step (that product, ``aaren.step``,
        ``out_proj``) is one operator, ``torch.ops.aaren.attention_step``, made of those
        three calls in C++ (autograd, ``torch.compile`` and export see the three). In eval
        mode under ``torch.no_grad()`` or ``torch.inference_mode()`` the stack is cached
        between calls and rebuilt as soon as ``query``, ``k_proj`` or ``v_proj`` change
        (in-place writes, replaced parameters, ``.to()``, ``load_state_dict``,
        ``train()``/``eval()``; writes through ``.data`` are invisible to it, as to
        autograd: call ``eval()`` after them). In training mode, with autograd on, under
        tracing or compilation it is built at every call. When ``v_proj`` or ``out_proj`` is
        not a plain ``nn.Linear`` without hooks (a LoRA wrapper, say), or in training with
        dropout, they are called as modules instead.
        """
        _check_token(x, self.embed_dim, "Aaren.step")
        if self.training and self.dropout > 0.0:  # token dropout acts between the products
            return self._step_through_modules(x, state)
        if torch.jit.is_scripting():
            weight, bias = self._step_projection()
        else:
            if not self._plain_projections():
                return self._step_through_modules(x, state)
            weight, bias = self._cached_step_projection()
            if type(weight) is not Tensor:  # DTensor: aaren.step has sharding rules, the operator none
                return self._step_through_modules(x, state)
        state_lse: Optional[Tensor] = None
        state_out: Optional[Tensor] = None
        if state is not None:
            if not torch.jit.is_scripting():
                _check_state(state, "Aaren.step")
            state_lse, state_out = state[0], state[1]
        y, lse, new_out = torch.ops.aaren.attention_step(
            x, weight, bias, self.out_proj.weight, self.out_proj.bias, self.num_heads,
            state_lse, state_out)
        return y, (lse, new_out)

    def _step_through_modules(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]]
                              ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """``step`` with ``v_proj`` and ``out_proj`` called as modules (their hooks, or
        whatever replaced them, take part) and token dropout between the products."""
        score_weight, score_bias = self._score_projection()
        score = F.linear(x, score_weight, score_bias)
        value = self.v_proj(x).view(x.size(0), self.num_heads, self.head_dim)
        out, new_state = _step(score.to(value.dtype), self._drop_tokens(value), state)
        return self.out_proj(out.flatten(1)), new_state

    @torch.jit.unused
    def _plain_projections(self) -> bool:
        """Whether ``v_proj`` and ``out_proj`` are plain ``nn.Linear`` modules without hooks,
        so that ``step`` may use their weights directly (stacked, and inside
        ``aaren.attention_step``) instead of calling them (a subclass, a wrapper such as a
        LoRA layer, or a hook would then be bypassed)."""
        modules = self._modules
        return all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
                   for m in (modules["v_proj"], modules["out_proj"]))


def _activation_fn(activation: Union[str, Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise ValueError(f"activation should be relu/gelu, not {activation}")
    return activation


class AarenEncoderLayer(nn.Module):
    r"""``nn.TransformerEncoderLayer`` with ``Aaren`` as self-attention.

    Same constructor arguments and submodule names (``self_attn``, ``linear1``, ``dropout``,
    ``linear2``, ``norm1``, ``norm2``, ``dropout1``, ``dropout2``), so the state dict of an
    ``nn.TransformerEncoderLayer`` converted by ``aaren.convert`` loads into it. Adds
    ``prefill`` and ``step`` (constant-memory streaming; state = the ``Aaren`` state).
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = Aaren(d_model, nhead, dropout=dropout, bias=bias,
                               batch_first=batch_first, **factory_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory_kwargs)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation_fn(activation)

    @classmethod
    def from_transformer_encoder_layer(cls, layer: nn.TransformerEncoderLayer
                                       ) -> "AarenEncoderLayer":
        """A copy of an ``nn.TransformerEncoderLayer`` (its self-attention converted by
        ``aaren.convert`` or not yet: then as ``convert`` would) as an AarenEncoderLayer.
        Training mode and every copied parameter's ``requires_grad`` are kept (for an
        ``nn.MultiheadAttention``, as in ``Aaren.from_multihead_attention``)."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(f"expected nn.TransformerEncoderLayer, got {type(layer).__name__}")
        attn = layer.self_attn
        if isinstance(attn, nn.MultiheadAttention):
            attn = Aaren.from_multihead_attention(attn)
        if not isinstance(attn, Aaren):
            raise TypeError(f"layer.self_attn is a {type(attn).__name__}, not Aaren or "
                            f"nn.MultiheadAttention")
        weight = layer.linear1.weight
        activation = layer.activation
        if isinstance(activation, nn.Module):
            activation = copy.deepcopy(activation)
        new = cls(attn.embed_dim, attn.num_heads, dim_feedforward=layer.linear1.out_features,
                  dropout=layer.dropout.p, activation=activation,
                  layer_norm_eps=layer.norm1.eps, batch_first=attn.batch_first,
                  norm_first=layer.norm_first, bias=layer.linear1.bias is not None,
                  device=weight.device, dtype=weight.dtype)
        new.self_attn = copy.deepcopy(attn)
        state = {k: v for k, v in layer.state_dict().items() if not k.startswith("self_attn.")}
        missing, unexpected = new.load_state_dict(state, strict=False)
        if unexpected or any(not key.startswith("self_attn.") for key in missing):
            raise ValueError(f"cannot copy {type(layer).__name__}: missing {missing}, "
                             f"unexpected {unexpected}")
        # load_state_dict copies values only: carry over which parameters train.
        targets = dict(new.named_parameters())
        for name, p in layer.named_parameters():
            if not name.startswith("self_attn."):
                targets[name].requires_grad_(p.requires_grad)
        new.train(layer.training)
        return new

    def _attn_input(self, x: Tensor) -> Tensor:
        return self.norm1(x) if self.norm_first else x

    def _finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """The residual connections, norms and feed-forward block around self-attention."""
        if self.norm_first:
            x = x + self.dropout1(attn)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self.dropout1(attn))
        return self.norm2(x + self._ff_block(x))

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        """As ``nn.TransformerEncoderLayer.forward`` (src_mask: None or the causal mask).
        With ``cu_seqlens``, src is packed sequences ``[T, E]`` (``Aaren.forward``)."""
        h = self._attn_input(src)
        attn = self.self_attn(h, h, h, key_padding_mask=src_key_padding_mask,
                              need_weights=False, attn_mask=src_mask, is_causal=is_causal,
                              cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[0]
        return self._finish(src, attn)

    @torch.jit.export
    def prefill(self, src: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None,
                src_key_padding_mask: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """A chunk of tokens (batched, in the layer's layout), continuing from ``state``."""
        attn, new_state = self.self_attn.prefill(self._attn_input(src), state,
                                                 src_key_padding_mask)
        return self._finish(src, attn), new_state

    @torch.jit.export
    def step(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
             ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """One token ``[B, E]``."""
        if not torch.jit.is_scripting():
            _check_tensor(x, "x", "AarenEncoderLayer.step")
        attn, new_state = self.self_attn.step(self._attn_input(x), state)
        return self._finish(x, attn), new_state


class AarenEncoder(nn.Module):
    r"""``nn.TransformerEncoder`` for ``AarenEncoderLayer``: ``num_layers`` copies of
    ``encoder_layer`` (deep copies, identical at first, as in PyTorch) and an optional final
    ``norm``. ``prefill``/``step`` take and return a list with one state per layer.

    ``enable_nested_tensor`` and ``mask_check`` are accepted for signature compatibility and
    ignored (there is no nested-tensor inference path).
    """

    def __init__(self, encoder_layer: AarenEncoderLayer, num_layers: int,
                 norm: Optional[nn.Module] = None, enable_nested_tensor: bool = True,
                 mask_check: bool = True) -> None:
        super().__init__()
        if not isinstance(encoder_layer, AarenEncoderLayer):
            raise TypeError(
                f"AarenEncoder needs an AarenEncoderLayer, got {type(encoder_layer).__name__} "
                f"(use aaren.convert for an nn.TransformerEncoder, or "
                f"AarenEncoder.from_transformer_encoder)")
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.mask_check = mask_check

    @classmethod
    def from_transformer_encoder(cls, encoder: nn.TransformerEncoder) -> "AarenEncoder":
        """A copy of an ``nn.TransformerEncoder`` (converted by ``aaren.convert`` or not) as
        an AarenEncoder, e.g. to stream a trained model with ``step``."""
        if not isinstance(encoder, nn.TransformerEncoder):
            raise TypeError(f"expected nn.TransformerEncoder, got {type(encoder).__name__}")
        layers = [AarenEncoderLayer.from_transformer_encoder_layer(layer)
                  for layer in encoder.layers]
        new = cls(layers[0], 0, norm=copy.deepcopy(encoder.norm))
        new.layers = nn.ModuleList(layers)
        new.num_layers = len(layers)
        new.train(encoder.training)
        return new

    def _check_states(self, states: Optional[List[Tuple[Tensor, Tensor]]]) -> None:
        if states is not None and len(states) != self.num_layers:
            raise ValueError(f"AarenEncoder: expected {self.num_layers} states (one per layer), "
                             f"got {len(states)}")

    def forward(self, src: Tensor, mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tensor:
        """As ``nn.TransformerEncoder.forward`` (mask: None or the causal mask). With
        ``cu_seqlens``, src is packed sequences ``[T, E]`` (``Aaren.forward``)."""
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                           is_causal=is_causal is not None and is_causal,
                           cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if self.norm is not None:
            output = self.norm(output)
        return output

    @torch.jit.export
    def prefill(self, src: Tensor, states: Optional[List[Tuple[Tensor, Tensor]]] = None,
                src_key_padding_mask: Optional[Tensor] = None
                ) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        """A chunk of tokens through every layer, continuing from ``states``."""
        self._check_states(states)
        output = src
        new_states: List[Tuple[Tensor, Tensor]] = []
        for i, layer in enumerate(self.layers):
            state: Optional[Tuple[Tensor, Tensor]] = None
            if states is not None:
                state = states[i]
            output, new_state = layer.prefill(output, state, src_key_padding_mask)
            new_states.append(new_state)
        if self.norm is not None:
            output = self.norm(output)
        return output, new_states

    @torch.jit.unused
    def empty_states(self, x: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """The states before any token for a batch shaped like ``x`` ([B, E]): per layer
        ``(lse [B, H] = -inf, out [B, H, head_dim] = 0)``, float64, on ``x``'s device
        (``aaren.functional.empty_state``). ``step`` from them equals ``step`` from None.
        Raises ValueError for an x that is not [B, E]."""
        _check_token(x, self.layers[0].self_attn.embed_dim if self.num_layers else None,
                     "AarenEncoder.empty_states")
        states: List[Tuple[Tensor, Tensor]] = []
        for layer in self.layers:
            attention = layer.self_attn
            states.append(_empty_state(x.size(0), attention.num_heads, attention.head_dim,
                                       x.dtype, x.device))
        return states

    @torch.jit.unused
    def compile_step(self, **compile_options) -> Callable[..., Tuple[Tensor, List[Tuple[Tensor, Tensor]]]]:
        """The fast path for streaming from Python: ``step`` compiled by ``torch.compile``.

        Returns ``fast_step(x, states=None) -> (y, states)`` with ``step``'s signature and
        results. ``states=None`` is replaced by ``empty_states(x)`` before the compiled
        graph is entered, so the first token and the following ones run one graph (a plain
        ``torch.compile(encoder.step)`` compiles a second graph when the states go from None
        to tensors). ``compile_options`` go to ``torch.compile`` (default
        ``fullgraph=True``). A new batch size or dtype recompiles, as for any compiled
        function. The graph reads the module's parameters at every call, so parameter
        updates are seen (nothing is frozen or cached). Each ``compile_step`` result keeps its own compiled
        graphs (Dynamo's limit of 8 per code object is not shared with other encoders or
        with ``torch.compile(encoder.step)``). An ``x`` that is not ``[B, E]`` or a wrong
        number of states raises ``step``'s ValueError before the graph is entered; states
        of another batch size raise ``aaren.step``'s RuntimeError (as Dynamo wraps it).

        For the latency against the layers' arithmetic, see docs/results.md, "The one-token
        step against its arithmetic" (benchmarks/bench_step_cpu.py).
        """
        return _fast_step.compile_step(self, **compile_options)

    @torch.jit.export
    def step(self, x: Tensor, states: Optional[List[Tuple[Tensor, Tensor]]] = None
             ) -> Tuple[Tensor, List[Tuple[Tensor, Tensor]]]:
        """One token ``[B, E]`` through every layer. For a compiled step without a
        recompile after the first token, see ``compile_step``."""
        if not torch.jit.is_scripting():
            _check_tensor(x, "x", "AarenEncoder.step")
        self._check_states(states)
        output = x
        new_states: List[Tuple[Tensor, Tensor]] = []
        for i, layer in enumerate(self.layers):
            state: Optional[Tuple[Tensor, Tensor]] = None
            if states is not None:
                state = states[i]
            output, new_state = layer.step(output, state)
            new_states.append(new_state)
        if self.norm is not None:
            output = self.norm(output)
        return output, new_states
