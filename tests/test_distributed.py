"""aaren on torch.distributed (docs/distributed.md): the context-parallel scan, context
parallelism for the modules, DDP, FSDP2, torch.compile, activation checkpointing and DTensor
over heads, each against one process, in 2 processes over gloo.

Each suite runs in its own pair of processes (tests/distributed_worker.py), started here with
a hard timeout: a collective that one rank skips would otherwise hang, and must fail instead.
AAREN_DISTRIBUTED_DEVICE=cuda runs the same suites with CUDA tensors (gloo, one GPU shared
by both processes; scripts/gpu_check.sh).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 240
DEVICE = os.environ.get("AAREN_DISTRIBUTED_DEVICE", "cpu")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_suite(suite: str, world: int = 2) -> str:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(
                   __import__("aaren").__file__)), os.environ.get("PYTHONPATH", "")] if p))
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), suite, DEVICE],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = "\n".join(p.communicate()[0] for p in procs)
        pytest.fail(f"suite {suite} did not finish in {TIMEOUT_S} s (a hang?):\n{logs[-6000:]}")
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    log = "\n".join(f"--- rank {r}\n{out}" for r, out in enumerate(outputs))
    assert not failed, f"ranks {failed} of suite {suite} failed:\n{log[-8000:]}"
    return log


def passed(log: str) -> int:
    """The number of cases reported passed (each rank prints one line per case)."""
    return sum(line.startswith("ok ") for line in log.splitlines())


def test_scan_exact_against_one_process():
    """Even, uneven, empty first/last chunk, one token per rank, masks across the boundary,
    everything masked, scores x1e4, float32; one all-gather forward and one reduce-scatter
    backward of B x H x (D + 1) float64 values; frozen inputs on one rank; errors."""
    log = run_suite("scan")
    assert passed(log) == 2 * 15, log


def test_packed_sequences_across_ranks():
    """aaren.distributed.scan(..., cu_seqlens=...): sequences crossing the rank boundary, with
    states, empty sequences and ranks, masks, float32; the encoder on packed sequences; errors."""
    log = run_suite("packed")
    assert passed(log) == 2 * 11, log


def test_checkpointing_and_compile():
    log = run_suite("checkpoint_compile")
    assert passed(log) == 2 * 4, log


def test_modules_context_parallel():
    log = run_suite("modules")
    assert passed(log) == 2 * 6, log


def test_ddp_fsdp2_and_context_parallel_training():
    log = run_suite("data_parallel")
    assert passed(log) == 2 * 5, log


def test_dtensor_over_heads():
    log = run_suite("dtensor")
    assert passed(log) == 2 * 4, log


def test_errors_without_a_process_group():
    """In this process (no process group): a clear error, before any communication."""
    import aaren
    import aaren.distributed as ad
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    s, v = torch.randn(1, 4, 2), torch.randn(1, 4, 2, 3)
    for call in (lambda: ad.scan(s, v), lambda: ad.shard_sequence(s),
                 lambda: ad.unshard_sequence(s),
                 lambda: ad.context_parallel(aaren.Aaren(4, 2))):
        with pytest.raises(RuntimeError, match="not initialized"):
            call()
    with pytest.raises(TypeError, match="holds no aaren.Aaren"):
        ad.context_parallel(torch.nn.Linear(2, 2), group=False)
