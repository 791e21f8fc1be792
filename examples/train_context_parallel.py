"""Train a small Aaren model with the sequence split over 2 processes (context parallelism),
and check its loss curve against the same training in one process.

The model (an embedding, an `aaren.AarenEncoder`, a linear head) learns, after each token of a
random stream, which token has been seen most often so far: every output depends on the whole
prefix, so the chunks on the two ranks must exchange their states to get it right.

Recipe (docs/distributed.md): every rank holds the same batch and its contiguous chunk of the
sequence (`aaren.distributed.shard_sequence`: tokens and targets alike);
`aaren.distributed.context_parallel(model, mesh)` makes every Aaren layer scan across the ranks;
FSDP2 (`fully_shard`) shards the parameters over the same ranks and sums (not averages) their
gradients, since each rank's loss is its share of the whole sequence's mean.

Rank 0 also trains an identical copy in this one process on the whole sequence, with the same
data, and the two loss curves must agree step by step (float64; measured: within 4e-16
relative, the check allows 1e-9).

Run: torchrun --nproc-per-node 2 examples/train_context_parallel.py   (CPU, gloo; ~20 s)
"""
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

import aaren
from aaren.distributed import context_parallel, shard_sequence

VOCAB, D_MODEL, HEADS, LAYERS, LENGTH, BATCH, STEPS = 5, 32, 4, 2, 64, 16, 40


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        layer = aaren.AarenEncoderLayer(D_MODEL, HEADS, 4 * D_MODEL, dropout=0.0,
                                        batch_first=True)
        self.encoder = aaren.AarenEncoder(layer, LAYERS)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def batch(generator):
    tokens = torch.randint(VOCAB, (BATCH, LENGTH), generator=generator)
    counts = F.one_hot(tokens, VOCAB).cumsum(dim=1)
    return tokens, counts.argmax(dim=-1)  # the most frequent token so far


def main():
    if "RANK" not in os.environ:
        raise SystemExit("run with: torchrun --nproc-per-node 2 examples/train_context_parallel.py")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # so that the two curves can be compared closely
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))

    reference = Model()  # the same initialization on every rank (same seed)
    model = copy.deepcopy(reference)
    context_parallel(model, mesh)
    for layer in model.encoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():  # the ranks' losses are parts of one sum: add gradients
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=3e-3)

    data = torch.Generator().manual_seed(1)  # the same batches on every rank
    worst = 0.0
    for step in range(STEPS):
        tokens, targets = batch(data)
        # context parallel: this rank's chunk of the sequence, its share of the mean loss
        logits = model(shard_sequence(tokens, mesh))
        loss = F.cross_entropy(logits.flatten(0, 1), shard_sequence(targets, mesh).flatten(),
                               reduction="sum") / targets.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)

        if rank == 0:  # one process, the whole sequence
            ref_loss = F.cross_entropy(reference(tokens).flatten(0, 1), targets.flatten())
            ref_optimizer.zero_grad()
            ref_loss.backward()
            ref_optimizer.step()
            difference = abs(total.item() - ref_loss.item())
            worst = max(worst, difference / ref_loss.item())
            if step % 5 == 0 or step == STEPS - 1:
                print(f"step {step:3d}  loss: context parallel over {world} ranks "
                      f"{total.item():.6f}, one process {ref_loss.item():.6f}, "
                      f"difference {difference:.1e}", flush=True)
    if rank == 0:
        print(f"largest relative difference of the loss curves over {STEPS} steps: {worst:.1e}")
        if worst > 1e-9:
            raise SystemExit("the context-parallel loss curve left the single-process one")
        print("OK: the context-parallel training follows the single-process training")
    # Both ranks done before either tears gloo down: rank 1 finishes first (rank 0 also trains
    # the reference), and tearing down while rank 0 still ran once aborted rank 1 in CI
    # ("terminate called without an active exception") after a passing run.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
