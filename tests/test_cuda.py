"""What only a GPU can check: CUDA against the CPU kernels at sizes that exercise the chunked
paths, non-default devices and streams, CUDA graphs and torch.compile(mode="reduce-overhead").
The rest of the suite runs on the cuda device too (the `device` fixture). Skipped without a GPU.
"""
import pytest
import torch

import aaren
from naive import reference_scan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def cpu_and_cuda_agree(B, N, H, D, dtype, with_state=False, masked=0.0, rtol=None, atol=None):
    torch.manual_seed(0)
    scores = torch.randn(B, N, H, dtype=torch.float32).mul_(3).to(dtype)
    if masked:
        scores = scores.masked_fill(torch.rand(B, N, H) < masked, float("-inf"))
    values = torch.randn(B, N, H, D, dtype=torch.float32).to(dtype)
    grad_out = torch.randn(B, N, H, D, dtype=torch.float32).to(dtype)
    state = None
    if with_state:
        state = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, D, dtype=torch.float64))
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_() for t in (scores, values, *(state or ()))]
        out, (lse, _) = aaren.scan(leaves[0], leaves[1], tuple(leaves[2:]) or None)
        (out * grad_out.to(device)).sum().backward()
        results.append([out, lse] + [leaf.grad for leaf in leaves])
    tolerance = {torch.float64: 1e-10, torch.float32: 2e-4}.get(dtype, 3e-2)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got.cpu(), want, rtol=rtol or tolerance, atol=atol or tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N", [1, 3, 1000, 4099])
@pytest.mark.parametrize("D", [1, 3, 64, 257])
def test_cuda_matches_cpu(dtype, N, D):
    cpu_and_cuda_agree(2, N, 3, D, dtype, with_state=N % 2 == 1, masked=0.2)


def test_odd_long_sequence_single_head():
    """N = 1000003 with one (batch, head): the split-N path with a ragged last chunk."""
    cpu_and_cuda_agree(1, 1_000_003, 1, 8, torch.float32)


def test_sequence_of_2_pow_20():
    torch.manual_seed(0)
    N = 1 << 20
    scores = torch.randn(1, N, 1, device="cuda", dtype=torch.float64)
    values = torch.randn(1, N, 1, 4, device="cuda", dtype=torch.float64)
    out, (lse, last) = aaren.scan(scores.float(), values.float())
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, 1), rtol=1e-6, atol=1e-5)
    weights = torch.softmax(scores[0, :, 0], 0)
    torch.testing.assert_close(last[0, 0].double(), weights @ values[0, :, 0], rtol=1e-4, atol=1e-5)


def test_gradcheck_on_cuda():
    torch.manual_seed(0)
    inputs = [torch.randn(2, 40, 3, dtype=torch.float64, device="cuda"),
              torch.randn(2, 40, 3, 5, dtype=torch.float64, device="cuda"),
              torch.randn(2, 3, dtype=torch.float64, device="cuda"),
              torch.randn(2, 3, 5, dtype=torch.float64, device="cuda")]
    inputs = [t.requires_grad_() for t in inputs]

    def outputs(s, v, l0, o0):
        out, (lse, _) = aaren.scan(s, v, (l0, o0))
        return out, lse

    assert torch.autograd.gradcheck(outputs, inputs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_non_default_device():
    scores = torch.randn(2, 50, 3, device="cuda:1")
    values = torch.randn(2, 50, 3, 8, device="cuda:1")
    out, (lse, _) = aaren.scan(scores, values)
    assert out.device == torch.device("cuda:1") and lse.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), aaren.scan(scores.cpu(), values.cpu())[0], rtol=2e-4, atol=2e-4)


def test_runs_on_the_current_stream():
    scores = torch.randn(4, 3000, 8, device="cuda")
    values = torch.randn(4, 3000, 8, 64, device="cuda")
    expected = aaren.scan(scores, values)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = aaren.scan(scores, values)[0]
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_cuda_graph_capture_and_replay():
    scores = torch.randn(4, 5000, 8, device="cuda")
    values = torch.randn(4, 5000, 8, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as CUDA graphs require
        aaren.scan(scores, values)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, (lse, _) = aaren.scan(scores, values)
    scores.copy_(torch.randn_like(scores))
    values.copy_(torch.randn_like(values))
    graph.replay()
    torch.cuda.synchronize()
    reference, _ = reference_scan(scores[:, :500].cpu(), values[:, :500].cpu())
    torch.testing.assert_close(out[:, :500].cpu().double(), reference, rtol=2e-4, atol=2e-4)


def test_compile_reduce_overhead():
    torch._dynamo.reset()

    def f(scores, values):
        out, (lse, _) = aaren.scan(scores, values)
        return out.sum(-1), lse

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # CUDA graphs are recorded after warm-up calls
        scores = torch.randn(2, 700, 4, device="cuda")
        values = torch.randn(2, 700, 4, 32, device="cuda")
        for got, want in zip(compiled(scores, values), f(scores, values)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B", [1, 8, 64])
def test_step_matches_scan_on_cuda(B):
    scores = torch.randn(B, 20, 4, device="cuda")
    values = torch.randn(B, 20, 4, 64, device="cuda")
    whole = aaren.scan(scores, values)[0]
    state = None
    for n in range(20):
        y, state = aaren.step(scores[:, n], values[:, n], state)
        torch.testing.assert_close(y, whole[:, n], rtol=1e-5, atol=1e-5)
