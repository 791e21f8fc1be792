"""One process of the 2-process torch.distributed tests (gloo). tests/test_distributed.py
starts two of these per suite (`python distributed_worker.py SUITE DEVICE` with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set); each runs every case of its suite in one process
group, prints "ok <case>" per case, and exits non-zero at the first failure.

Every case compares against single-process aaren on the whole data (the same on every rank:
the same seed), in float64, where the only difference is the order of the roundings.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import aaren
import aaren.distributed as ad

F64 = torch.float64
B, H, D = 2, 3, 4
DEVICE = torch.device("cpu")


def close(got, ref, what, scale_tol=1e-10):
    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    assert not torch.isnan(got).any(), f"{what}: NaN"
    scale = max(1.0, ref[torch.isfinite(ref)].abs().max().item()) if torch.isfinite(ref).any() else 1.0
    assert_close(got, ref, rtol=scale_tol, atol=scale_tol * scale, msg=lambda m: f"{what}: {m}")


def leaf(t):
    return t.detach().clone().requires_grad_()


class CountCollectives(TorchDispatchMode):
    """Records every functional collective (name, input shape, dtype). CommDebugMode counts
    collectives but does not record their sizes, which the communication test checks."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        # the communicating ops only (not wait_tensor, nor the autograd wrapper _wrap_*)
        # (older torch routes the autograd collectives through _c10d_functional_autograd)
        if func.namespace.startswith("_c10d_functional") and not name.startswith(("wait", "_")):
            self.calls.append((name, tuple(args[0].shape), args[0].dtype))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------ the scan

def scan_case(rank, world, lens, state=False, scale=1.0, mask=None, all_masked=False,
              dtype=F64, fn=None, tol=1e-10):
    """The distributed scan of chunks `lens` against one aaren.scan over the whole sequence:
    outputs, every rank's final state, and the gradients of a loss that uses all of them
    (scores, values, the initial state)."""
    fn = fn or ad.scan
    n = sum(lens)
    s = torch.randn(B, n, H, dtype=dtype, device=DEVICE) * scale
    if mask is not None:
        s[:, mask[0]:mask[1]] = float("-inf")
    if all_masked:
        s.fill_(float("-inf"))
    v = torch.randn(B, n, H, D, dtype=dtype, device=DEVICE)
    st = (torch.randn(B, H, dtype=F64, device=DEVICE) * scale,
          torch.randn(B, H, D, dtype=F64, device=DEVICE)) if state else None
    w = torch.randn(B, n, H, D, dtype=dtype, device=DEVICE)
    a = torch.randn(world, B, H, dtype=F64, device=DEVICE)
    b = torch.randn(world, B, H, D, dtype=F64, device=DEVICE)
    ends = [sum(lens[:r + 1]) for r in range(world)]

    # Reference: one process, the whole sequence; the state after each rank's last token.
    rs, rv = leaf(s), leaf(v)
    rst = tuple(leaf(t) for t in st) if state else None
    out, _ = aaren.scan(rs, rv, rst)
    loss = (out * w).sum()
    finals = []
    for r in range(world):
        fin = aaren.scan(rs[:, :ends[r]], rv[:, :ends[r]], rst)[1]
        finals.append(tuple(t.detach() for t in fin))
        loss = loss + (torch.where(torch.isinf(fin[0]), 0.0, fin[0]) * a[r]).sum() + (fin[1] * b[r]).sum()
    loss.backward()

    lo, hi = ends[rank] - lens[rank], ends[rank]
    cs, cv = leaf(s[:, lo:hi]), leaf(v[:, lo:hi])
    cst = tuple(leaf(t) for t in st) if (state and rank == 0) else None
    cout, (clse, cfin) = fn(cs, cv, cst)
    closs = (cout * w[:, lo:hi]).sum() + (torch.where(torch.isinf(clse), 0.0, clse) * a[rank]).sum() \
        + (cfin * b[rank]).sum()
    closs.backward()
    close(cout, out[:, lo:hi].detach(), "outputs", tol)
    close(clse, finals[rank][0], "final lse", tol)
    close(cfin, finals[rank][1], "final out", tol)
    close(cs.grad, rs.grad[:, lo:hi], "grad scores", tol)
    close(cv.grad, rv.grad[:, lo:hi], "grad values", tol)
    if cst is not None:
        close(cst[0].grad, rst[0].grad, "grad state lse", tol)
        close(cst[1].grad, rst[1].grad, "grad state out", tol)
    if all_masked:
        assert (cout == 0).all() and (cs.grad == 0).all() and (cv.grad == 0).all()
    return cout


def suite_scan(rank, world):
    cases = {
        "even split": dict(lens=[16, 16]),
        "even split with a state": dict(lens=[16, 16], state=True),
        "uneven 20/17 with a state": dict(lens=[20, 17], state=True),
        "empty first rank": dict(lens=[0, 12]),
        "empty first rank with a state": dict(lens=[0, 12], state=True),
        "empty last rank": dict(lens=[12, 0], state=True),
        "one token per rank": dict(lens=[1, 1], state=True),
        "a mask crossing the boundary": dict(lens=[16, 16], mask=(10, 22)),
        "rank 0 entirely masked": dict(lens=[8, 8], mask=(0, 11)),
        "everything masked": dict(lens=[8, 8], all_masked=True),
        "scores x1e4": dict(lens=[20, 17], state=True, scale=1e4, tol=1e-9),
    }
    for name, kw in cases.items():
        scan_case(rank, world, **kw)
        print("ok", name, flush=True)

    # float32 inputs: within a few float32 roundings of the single-process float32 scan.
    scan_case(rank, world, [20, 17], state=True, dtype=torch.float32, tol=1e-5)
    print("ok float32", flush=True)

    # Communication: exactly one all-gather forward and one reduce-scatter backward, of
    # B x H x (D + 1) float64 values per rank.
    s = leaf(torch.randn(B, 8, H, dtype=F64, device=DEVICE))
    v = leaf(torch.randn(B, 8, H, D, dtype=F64, device=DEVICE))
    with CountCollectives() as forward:
        out, (lse, fin) = ad.scan(s, v)
    with CountCollectives() as backward:
        (out.sum() + fin.sum()).backward()
    assert forward.calls == [("all_gather_into_tensor", (B, H, D + 1), F64)], forward.calls
    assert backward.calls == [("reduce_scatter_tensor", (world * B, H, D + 1), F64)], backward.calls
    print("ok communication volume", flush=True)

    # Inputs that need no gradient on one rank: the other's backward must not hang.
    s = torch.randn(B, 8, H, dtype=F64, device=DEVICE)
    v = torch.randn(B, 8, H, D, dtype=F64, device=DEVICE)
    if rank == 1:
        s.requires_grad_()
    out, _ = ad.scan(s, v)
    out.sum().backward()
    with torch.no_grad():
        out, _ = ad.scan(s, v)
    assert not out.requires_grad
    print("ok frozen inputs on one rank", flush=True)

    # Errors, raised before any communication (so on one rank alone).
    if rank == 1:
        try:
            ad.scan(s, v, (torch.zeros(B, H, dtype=F64), torch.zeros(B, H, D, dtype=F64)))
            raise AssertionError("a state on rank 1 must raise")
        except ValueError as e:
            assert "first" in str(e), e
    dist.barrier()
    for bad in ("not a group", 3):
        try:
            ad.scan(s, v, group=bad)
            raise AssertionError("a bad group must raise")
        except TypeError:
            pass
    print("ok errors", flush=True)


def suite_checkpoint_compile(rank, world):
    from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                        create_selective_checkpoint_contexts)

    def save_collectives(ctx, func, *args, **kwargs):
        if func.namespace.startswith("_c10d_functional"):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def full(s, v, st):
        return checkpoint(ad.scan, s, v, st, use_reentrant=False)

    def selective(s, v, st):
        return checkpoint(ad.scan, s, v, st, use_reentrant=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(save_collectives))

    for name, fn, gathers in (("full checkpointing", full, 2), ("selective checkpointing", selective, 1)):
        with CountCollectives() as count:
            scan_case(rank, world, [20, 17], state=True, fn=fn)
        kinds = [c[0] for c in count.calls]
        # the reference's single-process scans make no collective: these are the layer's own
        assert kinds.count("all_gather_into_tensor") == gathers, kinds
        assert kinds.count("reduce_scatter_tensor") == 1, kinds
        print("ok", name, f"({gathers} all-gather(s))", flush=True)

    compiled = torch.compile(ad.scan, fullgraph=True)
    scan_case(rank, world, [20, 17], state=True, mask=(15, 25), fn=compiled)
    # Inputs that need no gradient on rank 0 (the summary then gets its grad from a leaf
    # made outside the graph): no graph break, and rank 1's backward does not hang.
    s = torch.randn(B, 9, H, dtype=F64, device=DEVICE).requires_grad_(rank == 1)
    v = torch.randn(B, 9, H, D, dtype=F64, device=DEVICE).requires_grad_(rank == 1)
    out, _ = compiled(s, v)
    out.sum().backward()
    if rank == 1:
        grads = (s.grad, v.grad)
        s.grad = v.grad = None
    out, _ = ad.scan(s, v)
    out.sum().backward()
    if rank == 1:
        close(grads[0], s.grad, "compiled, frozen rank 0: grad scores")
        close(grads[1], v.grad, "compiled, frozen rank 0: grad values")
    print("ok torch.compile(fullgraph=True)", flush=True)

    # A context-parallel encoder layer compiled whole.
    torch.manual_seed(3)
    layer = encoder().layers[0]
    ref = copy.deepcopy(layer)
    ad.context_parallel(layer)
    x = torch.randn(B, 13, 8, dtype=F64, device=DEVICE)
    y = torch.compile(layer, fullgraph=True)(ad.shard_sequence(x))
    y_ref = ref(x)
    close(y, ad.shard_sequence(y_ref).detach(), "compiled context-parallel layer")
    y.sum().backward()
    y_ref.sum().backward()
    for (name, p), p_ref in zip(layer.named_parameters(), ref.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        close(grad, p_ref.grad, f"compiled context-parallel layer: grad {name}")
    print("ok torch.compile(fullgraph=True) of a context-parallel layer", flush=True)


# ------------------------------------------------------------------ modules

def encoder(batch_first=True):
    layer = aaren.AarenEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                    batch_first=batch_first, dtype=F64, device=DEVICE)
    return aaren.AarenEncoder(layer, 2, norm=nn.LayerNorm(8, dtype=F64, device=DEVICE))


def suite_modules(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    mesh = init_device_mesh(DEVICE.type, (world,), mesh_dim_names=("cp",))
    for batch_first in (True, False):
        for how in ("group", "mesh"):
            torch.manual_seed(1)
            ref = encoder(batch_first)
            model = copy.deepcopy(ref)
            if how == "group":
                ad.context_parallel(model)
            else:
                parallelize_module(model, mesh, ad.ContextParallel())
            n, seq_dim = 33, 1 if batch_first else 0
            x = torch.randn(B, n, 8, dtype=F64, device=DEVICE)
            pad = torch.zeros(B, n, dtype=torch.bool, device=DEVICE)
            pad[0, 12:21] = True  # crosses the boundary (17 | 16)
            pad[1, :20] = True    # everything on rank 0 masked for this sequence
            if not batch_first:
                x = x.transpose(0, 1)
            y_ref = ref(x, src_key_padding_mask=pad)
            w = torch.randn_like(y_ref)
            (y_ref * w).sum().backward()

            x_local = ad.shard_sequence(x, dim=seq_dim)
            y = model(x_local, src_key_padding_mask=ad.shard_sequence(pad, dim=1))
            close(y, ad.shard_sequence(y_ref, dim=seq_dim).detach(), "layer outputs")
            close(ad.unshard_sequence(y, dim=seq_dim), y_ref.detach(), "unsharded outputs")
            (y * ad.shard_sequence(w, dim=seq_dim)).sum().backward()
            for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
                grad = p.grad.clone()
                dist.all_reduce(grad)  # the context-parallel ranks' gradients add up
                close(grad, p_ref.grad, f"grad {name}")

            # prefill: the initial states on the first rank, the states after each chunk
            states = [(torch.randn(B, 2, dtype=F64), torch.randn(B, 2, 4, dtype=F64))
                      for _ in range(2)]
            y_ref, st_ref = ref.prefill(x, states, pad)
            y, st = model.prefill(x_local, states if rank == 0 else None,
                                  ad.shard_sequence(pad, dim=1))
            close(y, ad.shard_sequence(y_ref, dim=seq_dim).detach(), "prefill outputs")
            if rank == world - 1:
                for (l1, o1), (l2, o2) in zip(st, st_ref):
                    close(l1, l2.detach(), "prefill lse")
                    close(o1, o2.detach(), "prefill out")
            print("ok context parallel encoder", "batch_first" if batch_first else "seq_first",
                  how, flush=True)

    # Per layer: exactly one all-gather forward and one reduce-scatter backward.
    x_local = ad.shard_sequence(x, dim=seq_dim)  # the last model above: sequence-first
    with CountCollectives() as forward:
        y = model(x_local)
    with CountCollectives() as backward:
        y.sum().backward()
    layers = len(model.layers)
    assert forward.calls == [("all_gather_into_tensor", (B, 2, 5), F64)] * layers, forward.calls
    assert backward.calls == [("reduce_scatter_tensor", (world * B, 2, 5), F64)] * layers, backward.calls
    print("ok one all-gather and one reduce-scatter per layer", flush=True)

    ad.context_parallel(model, group=False)  # off again: the whole sequence on each rank
    close(model(x), ref(x).detach(), "context parallelism turned off")
    script = torch.jit.script(copy.deepcopy(ref))
    close(script(x), ref(x).detach(), "TorchScript")
    print("ok context_parallel off; TorchScript unaffected", flush=True)


# ------------------------------------------------------------------ data parallel

class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8, dtype=F64)
        self.layers = nn.ModuleList(
            [aaren.AarenEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=F64)
             for _ in range(2)])
        self.head = nn.Linear(8, 1, dtype=F64)

    def forward(self, x, checkpointed=False):
        h = self.embed(x)
        for layer in self.layers:
            if checkpointed:
                h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        return self.head(h).squeeze(-1)


def suite_data_parallel(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(2)
    ref = TinyModel().to(DEVICE)
    x = torch.randn(2 * world, 21, 3, dtype=F64, device=DEVICE)  # every rank's batch
    t = torch.randn(2 * world, 21, dtype=F64, device=DEVICE)
    F.mse_loss(ref(x), t).backward()  # one process, the whole batch
    mine = slice(2 * rank, 2 * rank + 2)

    for compiled, checkpointed in ((False, False), (False, True), (True, True)):
        ddp = DDP(copy.deepcopy(ref))
        ddp.zero_grad()
        run = torch.compile(ddp) if compiled else ddp
        F.mse_loss(run(x[mine], checkpointed=checkpointed), t[mine]).backward()
        for (name, p), p_ref in zip(ddp.module.named_parameters(), ref.parameters()):
            close(p.grad, p_ref.grad, f"DDP grad {name}")
        print("ok DDP", "compiled" if compiled else "eager",
              "checkpointed" if checkpointed else "", flush=True)

    mesh = init_device_mesh(DEVICE.type, (world,))
    fsdp = copy.deepcopy(ref)
    for p in fsdp.parameters():
        p.grad = None
    for layer in fsdp.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    F.mse_loss(fsdp(x[mine], checkpointed=True), t[mine]).backward()
    for (name, p), p_ref in zip(fsdp.named_parameters(), ref.parameters()):
        close(p.grad, p_ref.grad, f"FSDP2 grad {name}")
    print("ok FSDP2 checkpointed", flush=True)

    # FSDP2 + context parallelism on the same ranks (torchtitan's dp_cp mesh with dp = 1):
    # every rank holds the same batch and its chunk of the sequence; the loss is this rank's
    # share of the whole mean, and the gradients are summed (not averaged) over the ranks.
    cp = copy.deepcopy(ref)
    for p in cp.parameters():
        p.grad = None
    ad.context_parallel(cp, mesh)
    for layer in cp.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(cp, mesh=mesh)
    for module in cp.modules():  # each fully_shard unit reduces its own gradients
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
    whole = 2 * world
    y = cp(ad.shard_sequence(x[:whole], mesh))
    target = ad.shard_sequence(t[:whole], mesh)
    ((y - target) ** 2).sum().div(t[:whole].numel()).backward()
    for (name, p), p_ref in zip(cp.named_parameters(), ref.parameters()):
        close(p.grad, p_ref.grad, f"FSDP2 + context parallel grad {name}")
    print("ok FSDP2 + context parallel", flush=True)


# ------------------------------------------------------------------ DTensor over heads

def suite_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh(DEVICE.type, (world,))
    heads = 2 * world
    s = torch.randn(B, 12, heads, dtype=F64, device=DEVICE)
    v = torch.randn(B, 12, heads, D, dtype=F64, device=DEVICE)
    st = (torch.randn(B, heads, dtype=F64, device=DEVICE), torch.randn(B, heads, D, dtype=F64, device=DEVICE))
    w = torch.randn(B, 12, heads, D, dtype=F64, device=DEVICE)
    rs, rv, rst = leaf(s), leaf(v), tuple(leaf(t) for t in st)
    out, (lse, fin) = aaren.scan(rs, rv, rst)
    ((out * w).sum() + lse.sum() + fin.sum()).backward()

    for name, p_seq, p_state in (("heads", Shard(2), Shard(1)), ("batch", Shard(0), Shard(0)),
                                 ("sequence (redistributed, not scanned per shard)", Shard(1), Replicate())):
        ds = distribute_tensor(s, mesh, [p_seq]).requires_grad_()
        dv = distribute_tensor(v, mesh, [p_seq]).requires_grad_()
        dst = (distribute_tensor(st[0], mesh, [p_state]).requires_grad_(),
               distribute_tensor(st[1], mesh, [p_state]).requires_grad_())
        dout, (dlse, dfin) = aaren.scan(ds, dv, dst)
        if name == "heads":
            assert dout.placements == (Shard(2),) and dfin.placements == (Shard(1),), dout.placements
        ((dout.full_tensor() * w).sum() + dlse.full_tensor().sum() + dfin.full_tensor().sum()).backward()
        close(dout, out.detach(), f"DTensor {name} outputs")
        close(dlse, lse.detach(), f"DTensor {name} lse")
        close(dfin, fin.detach(), f"DTensor {name} final out")
        close(ds.grad, rs.grad, f"DTensor {name} grad scores")
        close(dv.grad, rv.grad, f"DTensor {name} grad values")
        close(dst[0].grad, rst[0].grad, f"DTensor {name} grad state lse")
        close(dst[1].grad, rst[1].grad, f"DTensor {name} grad state out")
        print("ok DTensor sharded over", name, flush=True)

    # step, and a scan without a state (its missing state gradient must not be materialized)
    y, (l1, o1) = aaren.step(s[:, 0], v[:, 0], st)
    dy, (dl1, do1) = aaren.step(distribute_tensor(s[:, 0], mesh, [Shard(1)]),
                                distribute_tensor(v[:, 0], mesh, [Shard(1)]),
                                (distribute_tensor(st[0], mesh, [Shard(1)]),
                                 distribute_tensor(st[1], mesh, [Shard(1)])))
    close(dy, y, "DTensor step output")
    close(do1, o1, "DTensor step state")
    ds = distribute_tensor(s, mesh, [Shard(2)]).requires_grad_()
    dv = distribute_tensor(v, mesh, [Shard(2)]).requires_grad_()
    dout, _ = aaren.scan(ds, dv)
    (dout.full_tensor() * w).sum().backward()
    rs, rv = leaf(s), leaf(v)
    (aaren.scan(rs, rv)[0] * w).sum().backward()
    close(ds.grad, rs.grad, "DTensor no-state grad scores")
    close(dv.grad, rv.grad, "DTensor no-state grad values")
    print("ok DTensor step; no state", flush=True)



# ------------------------------------------------------------------ packed sequences

def packed_case(rank, world, lengths, split, state=False, mask=None, dtype=F64, tol=1e-10):
    """aaren.distributed.scan(..., cu_seqlens=) of the packed tokens split `split` (tokens per
    rank) against one aaren.scan_varlen over all of them: this rank's outputs, the states after
    its tokens (after the last rank: every sequence's final state), and the gradients of
    scores, values and the state (each rank's part of the state's gradient: summed over the
    ranks, it is the single process's)."""
    T, N = sum(lengths), len(lengths)
    assert sum(split) == T
    torch.manual_seed(7)
    s = torch.randn(T, H, dtype=F64, device=DEVICE).to(dtype)
    v = torch.randn(T, H, D, dtype=F64, device=DEVICE).to(dtype)
    if mask is not None:
        s[mask[0]:mask[1], 0] = float("-inf")
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    st = (torch.randn(N, H, dtype=F64, device=DEVICE), torch.randn(N, H, D, dtype=F64, device=DEVICE)) \
        if state else None
    w = torch.randn(T, H, D, dtype=F64, device=DEVICE).to(dtype)
    wl, wo = torch.randn(N, H, dtype=F64, device=DEVICE), torch.randn(N, H, D, dtype=F64, device=DEVICE)

    rs, rv = leaf(s), leaf(v)
    rst = tuple(leaf(t) for t in st) if state else None
    rout, (rlse, rfin) = aaren.scan_varlen(rs, rv, cu, None, rst)
    ((rout * w).sum() + (rlse.nan_to_num(neginf=0) * wl).sum() + (rfin * wo).sum()).backward()

    lo, hi = sum(split[:rank]), sum(split[:rank + 1])
    cs, cv = leaf(s[lo:hi]), leaf(v[lo:hi])
    cst = tuple(leaf(t) for t in st) if state else None
    cout, (clse, cfin) = ad.scan(cs, cv, cst, cu_seqlens=cu, max_seqlen=max(lengths))
    close(cout, rout[lo:hi].detach(), "outputs", tol)
    loss = (cout * w[lo:hi]).sum()
    if rank == world - 1:  # the final states, and their gradients, on the last rank
        close(clse, rlse.detach(), "final lse", tol)
        close(cfin, rfin.detach(), "final out", tol)
        loss = loss + (clse.nan_to_num(neginf=0) * wl).sum() + (cfin * wo).sum()
    else:
        loss = loss + 0 * (clse.nan_to_num(neginf=0).sum() + cfin.sum())
    loss.backward()
    close(cs.grad, rs.grad[lo:hi], "grad scores", tol)
    close(cv.grad, rv.grad[lo:hi], "grad values", tol)
    if state:
        for got, want, what in ((cst[0].grad, rst[0].grad, "grad state lse"),
                                (cst[1].grad, rst[1].grad, "grad state out")):
            total = got.clone()
            dist.all_reduce(total)
            close(total, want, what, tol)


def suite_packed(rank, world):
    cases = {
        "sequences crossing the boundary": dict(lengths=[5, 20, 3, 9], split=[17, 20]),
        "with states": dict(lengths=[5, 20, 3, 9], split=[17, 20], state=True),
        "a boundary between sequences": dict(lengths=[5, 12, 3, 9], split=[17, 12], state=True),
        "one sequence over both ranks": dict(lengths=[30], split=[11, 19], state=True),
        "empty sequences at the ends and the boundary": dict(lengths=[0, 6, 0, 0, 7, 0],
                                                             split=[6, 7], state=True),
        "empty first rank": dict(lengths=[4, 0, 8], split=[0, 12], state=True),
        "empty last rank": dict(lengths=[4, 0, 8], split=[12, 0], state=True),
        "a mask crossing the boundary": dict(lengths=[25, 6], split=[15, 16], mask=(8, 20)),
        "float32": dict(lengths=[5, 20, 3, 9], split=[17, 20], state=True, dtype=torch.float32,
                        tol=1e-5),
    }
    for name, kw in cases.items():
        packed_case(rank, world, **kw)
        print("ok", name, flush=True)

    # The modules: an encoder on this rank's tokens of the packed stream, the global cu_seqlens.
    torch.manual_seed(1)
    ref = encoder()
    model = copy.deepcopy(ref)
    ad.context_parallel(model)
    lengths = [9, 14, 1, 0, 9]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0).to(torch.int32)
    x = torch.randn(sum(lengths), 8, dtype=F64, device=DEVICE)
    y_ref = ref(x, cu_seqlens=cu)
    w = torch.randn_like(y_ref)
    (y_ref * w).sum().backward()
    y = model(ad.shard_sequence(x, dim=0), cu_seqlens=cu)
    close(y, ad.shard_sequence(y_ref, dim=0).detach(), "encoder outputs")
    (y * ad.shard_sequence(w, dim=0)).sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        close(grad, p_ref.grad, f"grad {name}")
    print("ok context parallel encoder on packed sequences", flush=True)

    # Bad cu_seqlens raise on every rank alike, before the local scan (CPU).
    if DEVICE.type == "cpu":
        s, v = torch.randn(3, H, dtype=F64), torch.randn(3, H, D, dtype=F64)
        try:
            ad.scan(s, v, cu_seqlens=torch.tensor([0, 4, 5], dtype=torch.int32))
            raise AssertionError("cu_seqlens not ending at the tokens of all ranks must raise")
        except RuntimeError as e:
            assert "end at the tokens of all ranks (6)" in str(e), e
    print("ok errors", flush=True)


SUITES = {"scan": suite_scan, "checkpoint_compile": suite_checkpoint_compile,
          "modules": suite_modules, "data_parallel": suite_data_parallel,
          "dtensor": suite_dtensor, "packed": suite_packed}


def main():
    global DEVICE
    suite, device = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    DEVICE = torch.device(device)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(0)  # one GPU shared by the processes (gloo, no NCCL)
        torch.set_default_device(DEVICE)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    SUITES[suite](dist.get_rank(), dist.get_world_size())
    # Every check has passed once both ranks reach this barrier. The process then leaves
    # without tearing gloo down: its teardown sometimes aborts the process ("terminate called
    # without an active exception", seen on torch 2.11 after every case had passed), which
    # says nothing about aaren. On a failure the process exits with the exception instead,
    # and the other rank's collectives fail.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
