"""The functional API: scan (parallel, many tokens) and step (one token).

Layouts: scores [B, N, H], values [B, N, H, D] (the layout a Linear projection
reshaped to heads produces; read through its strides without copies as long as the
last dimension is contiguous). The state after some tokens is a pair
(lse [B, H], out [B, H, D]): the log-sum-exp of their scores (float64 for float64
values, float32 otherwise) and the attention output over them (dtype of values).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _library  # noqa: F401  (registers torch.ops.aaren)

State = Tuple[Tensor, Tensor]


def empty_state(batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """The state before any token: lse = -inf, out = 0."""
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.full([batch, heads], float("-inf"), dtype=lse_dtype, device=device)
    out = torch.zeros([batch, heads, head_dim], dtype=dtype, device=device)
    return lse, out


def scan(scores: Tensor, values: Tensor,
         state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Causal attention of one query per head over every prefix, as a parallel scan.

    out[:, k] = softmax(scores[:, :k+1]) @ values[:, :k+1] per (batch, head), continuing
    from `state` (the state after earlier tokens) when given. A score of -inf masks its
    token. Returns out [B, N, H, D] (dtype of values) and the state after the last token.
    Differentiable with respect to scores, values and the state.
    """
    if state is None:
        out, lse = torch.ops.aaren.scan_forward(scores, values, None, None)
    else:
        out, lse = torch.ops.aaren.scan_forward(scores, values, state[0], state[1])
    if values.size(1) == 0:  # an empty sequence leaves the state as it was
        if state is None:
            return out, empty_state(values.size(0), values.size(2), values.size(3),
                                    values.dtype, values.device)
        return out, state
    # A copy, not a view: a state kept for later must not hold on to the whole sequence.
    return out, (lse[:, -1].clone(), out[:, -1].clone())


def step(score: Tensor, value: Tensor,
         state: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One token, the RNN form: score [B, H], value [B, H, D].

    Returns the output for this token [B, H, D] and the new state; agrees with `scan`
    over the same tokens. Memory does not grow with the number of tokens seen.
    """
    if state is None:
        out, lse = torch.ops.aaren.step(score, value, None, None)
    else:
        out, lse = torch.ops.aaren.step(score, value, state[0], state[1])
    return out, (lse, out)
