"""The functional API: scan (parallel, many tokens) and step (one token).

Layouts: scores [B, N, H], values [B, N, H, D] (the layout a Linear projection
reshaped to heads produces; read through its strides without copies as long as the
last dimension is contiguous). The state after some tokens is a pair
(lse [B, H], out [B, H, D]): the log-sum-exp of their scores and the attention output
over them (docs/design.md, "The state").

The state is float64 (lse and out) for every dtype of values, so that a state carried
across `step` calls or `scan` chunks gives what one scan of the whole sequence gives,
however long the stream and however large the scores: a float32 lse loses its log part
when scores are large (|s| ~ 1e4), and a state rounded at every token drifts. It is
B x H x (D + 1) numbers whatever the number of tokens. A state in other floating dtypes
(the float32 lse and values-dtype out of earlier versions) is accepted and converted.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _library  # noqa: F401  (registers torch.ops.aaren)

State = Tuple[Tensor, Tensor]


def _check_state(state, op: str) -> None:
    """A state is a pair (lse, out); anything else gets an error naming it, not an
    IndexError or a silently ignored element. (TorchScript checks the type itself.)"""
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        kind = f"a {type(state).__name__} of {len(state)}" if isinstance(state, (tuple, list)) \
            else f"a {type(state).__name__}"
        raise TypeError(f"{op}: state must be a pair (lse [B, H], out [B, H, D]) or None, got {kind}")


def _check_tensor(x, name: str, where: str) -> None:
    """A TypeError naming the argument for a non-tensor (a list, say), not an AttributeError
    from its first tensor method. (TorchScript checks the type itself.)"""
    if not torch.jit.is_scripting():
        if not isinstance(x, Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(x).__name__}")


def _check_token(x: Tensor, embed_dim: Optional[int], where: str) -> None:
    """One token per batch row: x must be [B, E] (E unchecked when embed_dim is None)."""
    _check_tensor(x, "x", where)
    if x.dim() != 2 or (embed_dim is not None and x.size(-1) != embed_dim):
        raise ValueError(f"{where}: expected x of shape [B, E] with E={embed_dim}, "
                         f"got {list(x.shape)}")


def empty_state(batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """The state before any token: lse = -inf [B, H], out = 0 [B, H, D], both float64
    whatever `dtype` (the values' dtype; kept for the signature's sake)."""
    lse = torch.full([batch, heads], float("-inf"), dtype=torch.float64, device=device)
    out = torch.zeros([batch, heads, head_dim], dtype=torch.float64, device=device)
    return lse, out


def scan(scores: Tensor, values: Tensor,
         state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Causal attention of one query per head over every prefix, as a parallel scan.

    out[:, k] = softmax(scores[:, :k+1]) @ values[:, :k+1] per (batch, head), continuing
    from `state` (the state after earlier tokens) when given (design page, section 2).

    Args:
        scores: [B, N, H], float64, float32, bfloat16 or float16 (query . key, scaled).
            A score of -inf masks its token.
        values: [B, N, H, D], the dtype of scores, last dimension contiguous.
        state: (lse [B, H], out [B, H, D]) or None for the empty state.

    Returns:
        out [B, N, H, D] in the dtype of values, and the state after the last token
        (lse [B, H] and out [B, H, D], float64): its own storage, sharing none with `out`.

    Raises:
        RuntimeError / TypeError naming the argument for bad shapes, dtypes, devices.

    Differentiable with respect to scores, values and the state, to any order.
    """
    if state is None:
        out, lse, final_out = torch.ops.aaren.scan_forward(scores, values, None, None)
    else:
        if not torch.jit.is_scripting():
            _check_state(state, "aaren.scan")
        out, lse, final_out = torch.ops.aaren.scan_forward(scores, values, state[0], state[1])
    if values.size(1) == 0:  # an empty sequence leaves the state as it was
        if state is None:
            return out, empty_state(values.size(0), values.size(2), values.size(3),
                                    values.dtype, values.device)
        return out, (state[0].to(torch.float64), final_out)
    # A copy, not a view: a state kept for later must not hold on to the whole sequence.
    return out, (lse[:, -1].clone(), final_out)


def step(score: Tensor, value: Tensor,
         state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One token, the RNN form (design page, section 2: L' = logaddexp(L, s),
    o' = o e^(L - L') + v e^(s - L')).

    Args:
        score: [B, H]; value: [B, H, D] (same dtype); state: as for `scan`, or None.

    Returns:
        The token's output [B, H, D] in the dtype of value, and the new state (lse [B, H]
        and out [B, H, D], float64). The state shares no storage with
        the output: editing the output in place leaves later steps exact. Streaming N tokens
        with `step` gives `scan`'s outputs over them, in every dtype. Memory does not grow
        with the number of tokens seen.
    """
    if state is None:
        out, lse, state_out = torch.ops.aaren.step(score, value, None, None)
    else:
        if not torch.jit.is_scripting():
            _check_state(state, "aaren.step")
        out, lse, state_out = torch.ops.aaren.step(score, value, state[0], state[1])
    return out, (lse, state_out)


def scan_varlen(scores: Tensor, values: Tensor, cu_seqlens: Tensor,
                max_seqlen: Optional[int] = None,
                state: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """`scan` over packed sequences of different lengths (flash-attn's varlen layout).

    The N sequences lie one after another along the tokens: sequence i is the tokens
    ``cu_seqlens[i]:cu_seqlens[i + 1]`` of scores and values, and is scanned on its own (a
    segmented scan: no token sees another sequence's), from its own initial state
    ``(state[0][i], state[1][i])`` when `state` is given. Each sequence's outputs are those of
    ``aaren.scan`` over it alone.

    Args:
        scores: [T, H], float64, float32, bfloat16 or float16 (T: the tokens of all sequences).
            A score of -inf masks its token.
        values: [T, H, D], the dtype of scores, last dimension contiguous.
        cu_seqlens: [N + 1], int32 or int64, on the device of values: 0, then the cumulative
            sequence lengths (ending at T). Sequences of no tokens are allowed.
        max_seqlen: at least the longest sequence's length, or None. On CUDA it sizes the
            launch without reading cu_seqlens back to the host (no synchronization; the values
            of cu_seqlens are then not checked); on the CPU it is checked.
        state: (lse [N, H], out [N, H, D]), one initial state per sequence, or None for
            empty ones.

    Returns:
        out [T, H, D] in the dtype of values, and the state after each sequence's last token
        (lse [N, H] and out [N, H, D], float64; a sequence of no tokens keeps its initial
        state), of its own storage.

    Raises:
        RuntimeError / TypeError naming the argument for bad shapes, dtypes, devices, and for
        cu_seqlens that do not start at 0, decrease or do not end at T (docs/operators.md says
        which checks run where).

    Differentiable with respect to scores, values and the state, to any order.
    """
    if not torch.jit.is_scripting() and not isinstance(cu_seqlens, torch.Tensor):
        # A list would reach the dispatcher, whose message names the schema, not the fix.
        raise TypeError(f"aaren.scan_varlen: cu_seqlens must be a tensor (int32 or int64, "
                        f"[N + 1]), got {type(cu_seqlens).__name__}; e.g. "
                        f"torch.tensor(cu_seqlens, dtype=torch.int32, device=values.device)")
    if state is None:
        out, _, final_lse, final_out = torch.ops.aaren.scan_varlen_forward(
            scores, values, cu_seqlens, max_seqlen, None, None)
    else:
        if not torch.jit.is_scripting():
            _check_state(state, "aaren.scan_varlen")
        out, _, final_lse, final_out = torch.ops.aaren.scan_varlen_forward(
            scores, values, cu_seqlens, max_seqlen, state[0], state[1])
    return out, (final_lse, final_out)
