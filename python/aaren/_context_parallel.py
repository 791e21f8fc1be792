"""The context-parallel scan and the sequence sharding helpers: the functional layer of
`aaren.distributed` (which re-exports them), below the modules, which call `scan` when
`aaren.distributed.context_parallel` is on. Imports no aaren module but `functional`.

Context parallelism (docs/distributed.md): the sequence is split into contiguous chunks, one
per rank of a group, in rank order. Each rank scans its chunk from the empty state (the first
rank from the initial state), the ranks all-gather their chunks' summaries (the state after
the chunk: B x H x (D + 1) float64 numbers, independent of the chunk's length), each rank
combines the summaries of the ranks before it with the scan's own associative operator
(docs/design.md, "The recurrence" and "The state"), and fixes up its outputs elementwise:

    L_i' = logaddexp(L_in, L_i),   out_i' = e^(L_in - L_i') out_in + e^(L_i - L_i') out_i

where (L_in, out_in) is the incoming state and (L_i, out_i) the chunk's own per-token lse and
output. This is exact (the same result as one scan over the whole sequence, to the rounding)
and costs one all-gather forward and one reduce-scatter backward per call.
"""
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from .functional import _check_state, empty_state
from .functional import scan as _local_scan

__all__ = ["scan", "shard_sequence", "unshard_sequence"]

# The functional collectives' names: all_gather_single(_autograd) since torch 2.15, which
# deprecates all_gather_tensor(_autograd), the only names in older versions (2.11 - 2.14).
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_autograd = (getattr(funcol, "all_gather_single_autograd", None)
                        or funcol.all_gather_tensor_autograd)

# A float64 zero that requires grad, added to a summary that does not, so that the rank's
# outputs require grad and its backward runs the reduce-scatter. A leaf made here, outside
# any compiled region (torch.compile cannot make one, nor call requires_grad_ on an
# intermediate); 0-dim on the CPU, so it adds to tensors on any device; its gradient is
# dropped as soon as it is accumulated.
_GRAD_ANCHOR = torch.zeros((), dtype=torch.float64, requires_grad=True)
_GRAD_ANCHOR.register_post_accumulate_grad_hook(lambda anchor: setattr(anchor, "grad", None))

Group = Union[dist.ProcessGroup, "torch.distributed.device_mesh.DeviceMesh", None]


def _resolve(group) -> Tuple[object, int, int]:
    """(the group as the functional collectives take it, this rank's index in it, its size)
    for a ProcessGroup, a 1-D DeviceMesh or None (the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("aaren.distributed: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"aaren.distributed: a DeviceMesh for the sequence dimension must be "
                             f"1-D, got a {group.ndim}-D mesh {group.mesh_dim_names}; pass "
                             f"mesh['cp'] (the context-parallel dimension)")
        return group, group.get_local_rank(), group.size()
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"aaren.distributed: group must be a ProcessGroup, a 1-D DeviceMesh or "
                        f"None, got {type(group).__name__}")
    return group, dist.get_rank(group), dist.get_world_size(group)


def _combine(lse_a: Tensor, out_a: Tensor, lse_b: Tensor, out_b: Tensor,
             dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The scan's operator on two partial results, A (earlier) and B (docs/design.md):
    L = logaddexp(L_A, L_B), out = e^(L_A - L) out_A + e^(L_B - L) out_B, broadcasting.

    lse_* are float64; the weights are formed in float64, the weighted sum of the outputs in
    `dtype`, as one `torch.lerp(out_A, out_B, w_B)` (w_A = 1 - w_B): one pass over the
    outputs rather than three. Where both are empty (L = -inf) the result is (-inf, out_A)
    with every gradient 0, and out_A is then 0 (an empty result's out). The -inf guards come
    before any exp (a torch.where after it would still give NaN gradients). Written here
    rather than as aaren.scan with a state because it is elementwise over every token of the
    chunk (a scan would recompute the chunk)."""
    m = torch.maximum(lse_a, lse_b).detach()  # a stabilizer only: the result does not depend on it
    empty = m == float("-inf")
    m = torch.where(empty, torch.zeros_like(m), m)
    w_a = torch.exp(lse_a - m)  # lse = -inf gives exactly 0, and a 0 gradient
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    total = torch.where(empty, torch.ones_like(total), total)  # >= 1 elsewhere
    lse = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(total))
    weight = (w_b / total).to(dtype).unsqueeze(-1)
    return lse, torch.lerp(out_a.to(dtype), out_b.to(dtype), weight)


def _fix_up(lse_in: Tensor, out_in: Tensor, lse: Tensor, out: Tensor) -> Tensor:
    """A chunk's outputs out [B, N, H, D] (per-token lse [B, N, H], float64, both from a scan
    of the chunk alone) given the incoming state (lse_in [B, H], out_in [B, H, D]): each
    token's partial result combined with the state, in the values' dtype (weights in float64,
    the weighted sum in float32 at least): one torch.lerp pass over the outputs, and float64
    elementwise work per token, that a scan started from the state would not need
    (benchmarks/bench_context_parallel.py measures it)."""
    dtype = torch.promote_types(out.dtype, torch.float32)
    return _combine(lse_in.unsqueeze(1), out_in.unsqueeze(1), lse, out, dtype)[1].to(out.dtype)


def scan(scores: Tensor, values: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None, *,
         group: Group = None, cu_seqlens: Optional[Tensor] = None,
         max_seqlen: Optional[int] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """`aaren.scan` over a sequence split across the ranks of `group` (context parallelism).
    With `cu_seqlens`, `aaren.scan_varlen` over packed sequences split across the ranks
    (`_scan_packed` below).

    Each rank passes its contiguous chunk of the sequence, in rank order (rank 0 the first
    tokens); chunks may have any length, 0 included, and different lengths on different
    ranks. Each rank gets what one `aaren.scan` over the whole sequence gives on its chunk:
    its tokens' outputs and the state after its last token (after the chunks before it, for
    an empty chunk). Every rank of the group must call it, with the same B, H, D and dtype.

    Args:
        scores: [B, N_r, H], values: [B, N_r, H, D]: this rank's chunk, as for `aaren.scan`
            (a score of -inf masks its token; masks crossing chunk boundaries need nothing
            special).
        state: (lse [B, H], out [B, H, D]), the state before the whole sequence; only on the
            first rank of the group (None elsewhere).
        group: a ProcessGroup, a 1-D DeviceMesh, or None for the default group.

    Returns:
        out [B, N_r, H, D] in the dtype of values, and the state after this rank's last token
        (lse [B, H], out [B, H, D], float64).

    Raises:
        RuntimeError if torch.distributed is not initialized; ValueError for a state on a
        rank other than the first, or a multi-dimensional mesh; TypeError for a bad group or
        state; the operators' errors for bad shapes and dtypes.

    Communication: one all-gather of the B x H x (D + 1) float64 chunk summaries forward, one
    reduce-scatter of their gradients backward (functional collectives, so it traces under
    torch.compile(fullgraph=True)). Differentiable in scores, values and the state. Under
    grad mode the outputs always require grad, so that every rank takes part in the backward
    reduce-scatter (a rank that skipped it would leave the others waiting): call backward on
    every rank, and use torch.no_grad() for inference. The math: docs/distributed.md.
    """
    if cu_seqlens is not None:
        return _scan_packed(scores, values, cu_seqlens, max_seqlen, state, group)
    pg, rank, world = _resolve(group)
    if state is not None:
        _check_state(state, "aaren.distributed.scan")
        if rank != 0:
            raise ValueError(f"aaren.distributed.scan: the initial state belongs to the first "
                             f"rank (the chunk at the start of the sequence); rank {rank} of "
                             f"the group got one")
    if scores.dim() != 3 or values.dim() != 4:
        raise ValueError(f"aaren.distributed.scan: expected scores [B, N, H] and values "
                         f"[B, N, H, D], got {list(scores.shape)} and {list(values.shape)}")
    batch, n, heads, dim = values.shape

    # 1. The local scan: per-token outputs and lse, and the chunk's summary.
    if n > 0:
        if state is None:
            out, lse, final_out = torch.ops.aaren.scan_forward(scores, values, None, None)
        else:
            out, lse, final_out = torch.ops.aaren.scan_forward(scores, values, state[0], state[1])
        summary = (lse[:, -1], final_out)
    else:
        out, summary = _local_scan(scores, values, state)
        lse = None
    packed = torch.cat([summary[1], summary[0].to(torch.float64).unsqueeze(-1)], dim=-1)
    if torch.is_grad_enabled() and not packed.requires_grad:
        # Every rank must take part in the backward reduce-scatter, also one whose own inputs
        # need no gradient (an empty chunk, frozen inputs): its outputs depend on the others'.
        packed = packed + _GRAD_ANCHOR

    # 2. One all-gather of the summaries: [W * B, H, D + 1] (gloo takes only this layout).
    gathered = funcol.wait_tensor(_all_gather_autograd(packed, 0, pg))
    gathered = gathered.view(world, batch, heads, dim + 1)

    # 3. The incoming state: the summaries of the ranks before this one, combined by the scan
    # itself (float64). The later ranks' summaries are masked (-inf) rather than sliced away,
    # so that every rank's result depends on the gathered tensor (the first rank's too).
    before = torch.arange(world, device=gathered.device) < rank
    chunk_lse = torch.where(before.view(world, 1, 1), gathered[..., dim],
                            torch.full_like(gathered[..., dim], float("-inf")))
    _, (lse_in, out_in) = _local_scan(chunk_lse.permute(1, 0, 2), gathered[..., :dim].permute(1, 0, 2, 3))

    # 4. The fix-up: every output, and the state after the chunk.
    if n > 0:
        out = _fix_up(lse_in, out_in, lse, out)
    else:  # keep the (empty) outputs connected to the gathered tensor
        out = out + out_in.unsqueeze(1)[:, :0].to(out.dtype)
    final = _combine(lse_in, out_in, summary[0].to(torch.float64),
                     summary[1].to(torch.float64), torch.float64)
    return out, final


def _scan_packed(scores: Tensor, values: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int],
                 state: Optional[Tuple[Tensor, Tensor]], group: Group
                 ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """`aaren.scan_varlen` over packed sequences whose tokens are split across the ranks of
    `group`: rank r holds the contiguous tokens [o_r, o_r + T_r) of the packed stream (in rank
    order, any T_r, 0 included: e.g. `shard_sequence(x, dim=0)`), and every rank passes the
    same global `cu_seqlens` [N + 1] (and the same `state`, one per sequence, or None), so that
    sequences cross rank boundaries freely.

    The segmented scan is the same three steps as the dense one: (1) each rank scans its
    tokens with the global boundaries moved to its own (clamp(cu_seqlens - o_r, 0, T_r): the N
    sequences, most of them empty here), sequence i from its initial state on the rank where
    it starts, else from the empty one; (2) one all-gather of every rank's N states after its
    tokens (N x H x (D + 1) float64 numbers per rank) and of T_r (for o_r); (3) the incoming
    state of sequence i on rank r is the ranks before r combined (those before i starts are
    empty), and only the sequence holding the rank's first token can have one that is not
    empty: its tokens are fixed up elementwise, as the dense scan's chunk is.

    Returns this rank's outputs [T_r, H, D] and the state of every sequence after this
    rank's last token (lse [N, H], out [N, H, D]): on the last rank, each sequence's final
    state. Nothing is read back to the host on CUDA; on the CPU the global cu_seqlens is
    checked against the total number of tokens on every rank (so that all raise alike,
    before any rank waits in a collective)."""
    pg, rank, world = _resolve(group)
    if state is not None:
        _check_state(state, "aaren.distributed.scan")
    if scores.dim() != 2 or values.dim() != 3:
        raise ValueError(f"aaren.distributed.scan: with cu_seqlens, expected packed scores "
                         f"[T, H] and values [T, H, D], got {list(scores.shape)} and "
                         f"{list(values.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"aaren.distributed.scan: cu_seqlens must be the global boundaries "
                         f"[N + 1], got shape {list(cu_seqlens.shape)}")
    tokens, heads, dim = values.shape
    sequences = cu_seqlens.numel() - 1
    bounds = cu_seqlens.to(torch.int64)

    # This rank's offset o_r: every rank's T_r, gathered (on the device: no host sync).
    counts = funcol.wait_tensor(_all_gather(
        torch.tensor([tokens], dtype=torch.int64, device=values.device), 0, pg))
    offset = counts[:rank].sum()
    if bounds.device.type == "cpu":  # free to check here, on every rank alike
        total = int(counts.sum())
        steps = bounds[1:] - bounds[:-1]
        if int(bounds[0]) != 0 or bool((steps < 0).any()) or int(bounds[-1]) != total:
            raise RuntimeError(f"aaren.distributed.scan: cu_seqlens must start at 0, never "
                               f"decrease and end at the tokens of all ranks ({total}), got "
                               f"{bounds.tolist()}")

    # 1. The local packed scan: the global boundaries moved to this rank's tokens; a
    # sequence's initial state enters where it starts (the last rank for those starting at
    # the very end, with no tokens).
    local = (bounds - offset).clamp(0, tokens)
    starts = bounds[:-1]
    end = offset + tokens
    enters = (starts >= offset) & (starts < end)
    if rank == world - 1:
        enters = enters | (starts >= end)
    if state is None:
        local_lse0, local_out0 = None, None
    else:
        enters_here = enters.to(state[0].device)
        local_lse0 = torch.where(enters_here.unsqueeze(-1), state[0].to(torch.float64),
                                 torch.full_like(state[0], float("-inf"), dtype=torch.float64))
        local_out0 = torch.where(enters_here.view(-1, 1, 1), state[1].to(torch.float64),
                                 torch.zeros_like(state[1], dtype=torch.float64))
    out, lse, final_lse, final_out = torch.ops.aaren.scan_varlen_forward(
        scores, values, local.to(cu_seqlens.dtype), max_seqlen, local_lse0, local_out0)

    # 2. One all-gather of the N states after this rank's tokens: [W * N, H, D + 1].
    packed = torch.cat([final_out, final_lse.unsqueeze(-1)], dim=-1)
    if torch.is_grad_enabled() and not packed.requires_grad:
        packed = packed + _GRAD_ANCHOR  # every rank takes part in the backward (see scan)
    gathered = funcol.wait_tensor(_all_gather_autograd(packed, 0, pg))
    gathered = gathered.view(world, sequences, heads, dim + 1)

    # 3. The incoming states [N, H(, D)]: the ranks before this one combined in order.
    before = torch.arange(world, device=gathered.device) < rank
    chunk_lse = torch.where(before.view(world, 1, 1), gathered[..., dim],
                            torch.full_like(gathered[..., dim], float("-inf")))
    _, (lse_in, out_in) = _local_scan(chunk_lse.permute(1, 0, 2),
                                      gathered[..., :dim].permute(1, 0, 2, 3))

    # The fix-up of the tokens of the sequence holding this rank's first token (the others'
    # incoming states are empty: they start here); the others are left as they are.
    if tokens > 0:
        first = (torch.searchsorted(bounds, offset.view(1), right=True) - 1).clamp(0, sequences - 1)
        continued = torch.arange(tokens, device=out.device) < local.index_select(0, first + 1).to(out.device)
        fixed = _fix_up(lse_in.index_select(0, first), out_in.index_select(0, first),
                        lse.unsqueeze(0), out.unsqueeze(0))[0]
        out = torch.where(continued.view(-1, 1, 1), fixed, out)
    else:  # keep the (empty) outputs connected to the gathered tensor
        out = out + out_in[:1, :, :].expand(0, heads, dim).to(out.dtype) if sequences else out
    final = _combine(lse_in, out_in, final_lse, final_out, torch.float64)
    return out, final


# ------------------------------------------------------------------ sequence sharding helpers

def shard_sequence(x: Tensor, group: Group = None, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of `x` along `dim` (the sequence dimension: 1 for
    [B, N, ...] batch-first tensors, 0 for [N, B, ...]), split as `torch.tensor_split` does
    (the first N % W ranks get one token more). Apply it to the inputs, targets and key
    padding masks alike; a view, differentiable."""
    _, rank, world = _resolve(group)
    return torch.tensor_split(x, world, dim=dim)[rank]


def unshard_sequence(x: Tensor, group: Group = None, dim: int = 1) -> Tensor:
    """The whole sequence from every rank's chunk along `dim` (chunks of any lengths, in rank
    order), on every rank; differentiable (the backward gives each rank its chunk's gradient
    summed over the ranks). The inverse of `shard_sequence`. Two collectives (the lengths,
    then the chunks padded to the longest): for evaluation and tests rather than every step."""
    pg, _, world = _resolve(group)
    xs = x.movedim(dim, 0)
    lengths = _all_gather(torch.tensor([xs.size(0)], device=x.device), 0, pg)
    lengths = [int(n) for n in funcol.wait_tensor(lengths).tolist()]
    longest = max(lengths)
    padded = torch.cat([xs, xs.new_zeros((longest - xs.size(0),) + tuple(xs.shape[1:]))])
    gathered = funcol.wait_tensor(_all_gather_autograd(padded.contiguous(), 0, pg))
    pieces = [gathered[i * longest:i * longest + n] for i, n in enumerate(lengths)]
    return torch.cat(pieces).movedim(0, dim)
