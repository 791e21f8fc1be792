"""Aaren on torch.distributed: the context-parallel scan, sequence sharding helpers,
context parallelism for the modules, and DTensor sharding rules (tensor parallel over heads).

The context-parallel scan itself (`scan`, `shard_sequence`, `unshard_sequence`; the math in
docs/distributed.md) lives in `aaren._context_parallel`, below the modules, which call it;
this module, above them, re-exports it.
"""
import torch
import torch.distributed as dist
from torch import nn

from ._context_parallel import Group, _resolve, scan, shard_sequence, unshard_sequence
from ._context_parallel import _combine, _fix_up  # noqa: F401  (benchmarks/bench_context_parallel.py times _fix_up)
from .modules import Aaren

__all__ = ["scan", "shard_sequence", "unshard_sequence", "context_parallel",
           "ContextParallel", "register_dtensor_sharding"]


# ------------------------------------------------------------------ modules

def context_parallel(module: nn.Module, group: Group = None) -> nn.Module:
    """Context parallelism for every `aaren.Aaren` in `module` (an `Aaren`,
    `AarenEncoderLayer`, `AarenEncoder` or any model holding them), in place: their
    `forward` and `prefill` then take this rank's chunk of the sequence (see
    `shard_sequence`; key padding masks sharded alike) and compute with
    `aaren.distributed.scan` over `group`, giving each rank what the whole sequence gives on
    its chunk. Everything else in those layers is per token. `attn_mask` must be None (the
    layers are causal anyway); `prefill`'s state is the state before the whole sequence on
    the first rank (None elsewhere) and it returns the state after this rank's chunk;
    `step` is unchanged (one token, one rank). `group=False` turns it off again.
    Returns `module`. Raises TypeError if `module` holds no Aaren."""
    if group is not False:
        _resolve(group)  # fail now, not in the first forward
    found = False
    for sub in module.modules():
        if isinstance(sub, Aaren):
            found = True
            if group is False:
                sub.__dict__.pop("_context_parallel", None)
            else:
                # Kept out of the module's attributes (TorchScript would try to type a
                # ProcessGroup); a 1-tuple since None means the default group.
                sub.__dict__["_context_parallel"] = (group,)
    if not found:
        raise TypeError(f"context_parallel: {type(module).__name__} holds no aaren.Aaren")
    return module


try:
    from torch.distributed.tensor.parallel import ParallelStyle as _ParallelStyle
except ImportError:  # torch.distributed built without tensor parallelism
    _ParallelStyle = object


class ContextParallel(_ParallelStyle):
    """A `ParallelStyle` for `torch.distributed.tensor.parallel.parallelize_module`:
    `parallelize_module(model, mesh["cp"], ContextParallel())` (or a plan mapping module
    names to it) applies `context_parallel` with that 1-D mesh."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return context_parallel(module, device_mesh)


# ------------------------------------------------------------------ DTensor (tensor parallel)

_dtensor_registered = False


def register_dtensor_sharding() -> None:
    """Registers DTensor sharding rules for `torch.ops.aaren.scan_forward`, `scan_backward`
    and `step` (done when this module is imported; idempotent): every tensor replicated,
    sharded over the batch, or sharded over the heads, so that `aaren.scan` / `aaren.step`
    on DTensors (tensor parallel over heads) give the unsharded result, gradients included.
    No rule shards the sequence dimension: each shard would scan from the empty state and
    be silently wrong; DTensor redistributes such inputs (to replicated) instead. Context
    parallelism is `aaren.distributed.scan`."""
    global _dtensor_registered
    if _dtensor_registered:
        return
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    def opt(spec, placement):  # optional tensor arguments (the state) may be None
        return None if spec is None else placement

    @register_sharding(torch.ops.aaren.scan_forward.default)
    def _scan_forward(scores, values, state_lse=None, state_out=None):
        return [([p_seq] * 2 + [p_state], [p_seq, p_seq, opt(state_lse, p_state), opt(state_out, p_state)])
                for p_seq, p_state in ((Replicate(), Replicate()), (Shard(0), Shard(0)),
                                       (Shard(2), Shard(1)))]

    @register_sharding(torch.ops.aaren.scan_backward.default)
    def _scan_backward(grad_out, grad_lse, scores, values, out, lse, state_lse=None,
                       state_out=None):
        return [([p_seq, p_seq, p_state, p_state],
                 [opt(grad_out, p_seq), opt(grad_lse, p_seq), p_seq, p_seq, p_seq, p_seq,
                  opt(state_lse, p_state), opt(state_out, p_state)])
                for p_seq, p_state in ((Replicate(), Replicate()), (Shard(0), Shard(0)),
                                       (Shard(2), Shard(1)))]

    @register_sharding(torch.ops.aaren.step.default)
    def _step(score, value, state_lse=None, state_out=None):
        return [([p] * 3, [p, p, opt(state_lse, p), opt(state_out, p)])
                for p in (Replicate(), Shard(0), Shard(1))]

    _dtensor_registered = True


if dist.is_available():
    try:
        register_dtensor_sharding()
    except ImportError:  # no DTensor in this build of torch
        pass
