"""The operators in the rest of PyTorch: opcheck, torch.compile, torch.export, TorchScript,
the build report and the torch version guard."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import aaren
from aaren._library import check_torch_version
from naive import reference_scan


def sample_inputs(device, dtype=torch.float32, N=6, with_state=True, requires_grad=False,
                  earlier_state_dtypes=False):
    """The state in its dtypes (float64), or in those of earlier versions (a float32 lse and
    an out in the values' dtype), which the operators still accept."""
    B, H, D = 2, 3, 5
    scores = torch.randn(B, N, H, device=device, dtype=dtype)
    values = torch.randn(B, N, H, D, device=device, dtype=dtype)
    lse0 = torch.randn(B, H, device=device, dtype=torch.float32 if earlier_state_dtypes else torch.float64)
    out0 = torch.randn(B, H, D, device=device, dtype=dtype if earlier_state_dtypes else torch.float64)
    tensors = [scores, values] + ([lse0, out0] if with_state else [None, None])
    return [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("state", ["none", "float64", "earlier dtypes"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_scan_forward(device, dtype, state, requires_grad):
    args = sample_inputs(device, dtype, with_state=state != "none", requires_grad=requires_grad,
                         earlier_state_dtypes=state == "earlier dtypes")
    torch.library.opcheck(torch.ops.aaren.scan_forward.default, args)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_step(device, with_state, requires_grad):
    scores, values, lse0, out0 = sample_inputs(device, with_state=with_state, requires_grad=requires_grad)
    args = [scores[:, 0].detach().requires_grad_(requires_grad),
            values[:, 0].detach().requires_grad_(requires_grad), lse0, out0]
    torch.library.opcheck(torch.ops.aaren.step.default, args)


@pytest.mark.parametrize("with_grads", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("earlier_state_dtypes", [False, True])
def test_opcheck_scan_backward(device, with_grads, earlier_state_dtypes):
    scores, values, lse0, out0 = sample_inputs(device, earlier_state_dtypes=earlier_state_dtypes)
    out, lse, _ = torch.ops.aaren.scan_forward(scores, values, lse0, out0)
    grad_out = torch.randn_like(out) if with_grads[0] else None
    grad_lse = torch.randn_like(lse) if with_grads[1] else None
    torch.library.opcheck(torch.ops.aaren.scan_backward.default,
                          [grad_out, grad_lse, scores, values, out, lse, lse0, out0])


def scan_then_reduce(scores, values, lse0, out0):
    out, (lse, last) = aaren.scan(scores, values, (lse0, out0))
    return out.sin().sum() + lse.sum() + last.sum()


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_forward_and_backward(device, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(scan_then_reduce, fullgraph=True, dynamic=dynamic)
    for N in (5, 9):
        eager_inputs = sample_inputs(device, N=N, requires_grad=True)
        compiled_inputs = [t.detach().clone().requires_grad_() for t in eager_inputs]
        expected = scan_then_reduce(*eager_inputs)
        expected.backward()
        got = compiled(*compiled_inputs)
        got.backward()
        torch.testing.assert_close(got, expected)
        for a, b in zip(compiled_inputs, eager_inputs):
            # The float64 state's gradients come from float32 arithmetic (inductor fuses the
            # float32 grad_out differently): float32's tolerances.
            torch.testing.assert_close(a.grad, b.grad, rtol=1.3e-6, atol=1e-5)


def test_compile_step_fullgraph(device):
    torch._dynamo.reset()

    def stream(scores, values):
        state = None
        outs = []
        for n in range(scores.size(1)):
            y, state = aaren.step(scores[:, n], values[:, n], state)
            outs.append(y)
        return torch.stack(outs, 1)

    scores, values, _, _ = sample_inputs(device, with_state=False)
    torch.testing.assert_close(torch.compile(stream, fullgraph=True)(scores, values), stream(scores, values))


class ScanModule(torch.nn.Module):
    def forward(self, scores, values, lse0, out0):
        out, (lse, last) = aaren.scan(scores, values, (lse0, out0))
        return out, lse, last


def test_export_with_dynamic_sequence_length(device):
    inputs = sample_inputs(device, N=6)
    length = torch.export.Dim("length", min=2)
    exported = torch.export.export(ScanModule(), tuple(inputs),
                                   dynamic_shapes=({1: length}, {1: length}, None, None))
    assert any("aaren.scan_forward" in str(node.target) for node in exported.graph.nodes)
    longer = sample_inputs(device, N=11)
    for got, want in zip(exported.module()(*longer), ScanModule()(*longer)):
        torch.testing.assert_close(got, want)


@torch.jit.script
def scripted_scan_and_step(scores: torch.Tensor, values: torch.Tensor):
    out, state = aaren.scan(scores[:, :-1], values[:, :-1])
    last, state = aaren.step(scores[:, -1], values[:, -1], state)
    return out, last, state[0]


def test_torchscript_function_saved_and_loaded(device, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scores, values, _, _ = sample_inputs(device, dtype=torch.float64, with_state=False)
        expected, _ = reference_scan(scores, values)

        class Wrapper(torch.nn.Module):
            def forward(self, scores, values):
                return scripted_scan_and_step(scores, values)

        path = tmp_path / "scan.pt"
        torch.jit.script(Wrapper()).save(str(path))
        loaded = torch.jit.load(str(path))
        out, last, lse = loaded(scores, values)
        torch.testing.assert_close(out, expected[:, :-1])
        torch.testing.assert_close(last, expected[:, -1])
        torch.testing.assert_close(lse, torch.logsumexp(scores, dim=1))

        # Autograd through the loaded model (the C++ autograd kernels, scan and step): the
        # gradients of every output against autograd through the reference, and gradcheck.
        def through_reference(scores, values):
            ref_out, ref_lse = reference_scan(scores, values)
            return ref_out[:, :-1], ref_out[:, -1], ref_lse[:, -1]

        seeds = [torch.randn_like(t) for t in (out, last, lse)]
        grads = []
        for fn in (loaded, through_reference):
            leaves = [scores.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()]
            grads.append(torch.autograd.grad(fn(*leaves), leaves, seeds))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        leaves = (scores.detach().clone().requires_grad_(), values.detach().clone().requires_grad_())
        assert torch.autograd.gradcheck(loaded, leaves)


def test_build_report():
    info = aaren.build_info()
    assert info["version"] == aaren.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["openmp"] is True, "at::parallel_for must really run in parallel"
    assert info["cpu_isa_selected"] in info["cpu_isas_compiled"].split(",")
    report = subprocess.run([sys.executable, "-m", "aaren", "--json"], check=True,
                            capture_output=True, text=True)
    assert json.loads(report.stdout)["version"] == aaren.__version__
    prefix = subprocess.run([sys.executable, "-m", "aaren", "--cmake-prefix-path"], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert os.path.isfile(os.path.join(prefix, "share", "cmake", "aaren", "aarenConfig.cmake"))


def test_parallel_kernels_use_every_thread_setting():
    """The same result with one thread as with two, forward and backward (the work split must
    not matter), on a problem large enough that two threads really run: plan_work
    (csrc/ops/cpu/work_plan.cpp) makes B = 16 tasks of N * H * D = 32 * 8 * 16 = 4096
    elements here, so the grain is 2^15 / 4096 = 8 tasks and at::parallel_for, which runs
    inline unless tasks > grain, gives 8 tasks to each of 2 threads."""
    B, N, H, D = 16, 32, 8, 16
    assert B > (1 << 15) // (N * H * D)
    scores = 5 * torch.randn(B, N, H, dtype=torch.float64)
    values = torch.randn(B, N, H, D, dtype=torch.float64)
    grad_out = torch.randn(B, N, H, D, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            s, v = scores.clone().requires_grad_(), values.clone().requires_grad_()
            out = aaren.scan(s, v)[0]
            out.backward(grad_out)
            results.append((out.detach(), s.grad, v.grad))
    finally:
        torch.set_num_threads(threads)
    for single, double in zip(*results):
        assert torch.equal(single, double)


def test_torch_version_guard():
    check_torch_version("2.15.0", "2.15.1+cu132")
    with pytest.raises(ImportError, match="compiled against PyTorch 2.15.0, but PyTorch 2.16.0 is installed"):
        check_torch_version("2.15.0", "2.16.0")


def test_import_refuses_other_torch(tmp_path):
    script = ("import torch; torch.__version__ = '9.9.0'\n"
              "try:\n    import aaren\nexcept ImportError as e:\n    print('refused:', e)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "refused: aaren was compiled against PyTorch" in result.stdout


def test_into_forms_write_into_given_buffers(device):
    scores, values, lse0, out0 = sample_inputs(device)
    out, lse, final = torch.empty_like(values), torch.empty_like(scores, dtype=torch.float64), \
        torch.empty_like(out0)
    assert torch.ops.aaren.scan_forward_into(scores, values, lse0, out0, out, lse, final) is None
    expected_out, expected_lse, expected_final = torch.ops.aaren.scan_forward(scores, values, lse0, out0)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    assert torch.equal(final, expected_final)
    torch.library.opcheck(torch.ops.aaren.scan_forward_into.default,
                          (scores, values, lse0, out0, torch.empty_like(values),
                           torch.empty_like(lse), torch.empty_like(final)))

    grad_out = torch.randn_like(out)
    grads = [torch.empty_like(scores), torch.empty_like(values), torch.empty_like(lse0), torch.empty_like(out0)]
    torch.ops.aaren.scan_backward_into(grad_out, None, scores, values, out, lse, lse0, out0, *grads)
    expected = torch.ops.aaren.scan_backward(grad_out, None, scores, values, out, lse, lse0, out0)
    for got, want in zip(grads, expected):
        assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.aaren.scan_backward_into.default,
                          (grad_out, None, scores, values, out, lse, lse0, out0,
                           *[torch.empty_like(g) for g in grads]))


def test_into_forms_reject_wrong_buffers(device):
    scores, values, _, _ = sample_inputs(device, with_state=False)
    lse = torch.empty_like(scores, dtype=torch.float64)
    final = torch.empty(values.size(0), values.size(2), values.size(3), dtype=torch.float64,
                        device=device)
    into = torch.ops.aaren.scan_forward_into
    with pytest.raises(RuntimeError, match="out must have shape"):
        into(scores, values, None, None, torch.empty_like(values)[:, :2], lse, final)
    with pytest.raises(TypeError, match="out must be Float, got Double"):
        into(scores, values, None, None, torch.empty_like(values).double(), lse, final)
    with pytest.raises(TypeError, match="lse must be Double, got Float"):
        into(scores, values, None, None, torch.empty_like(values), lse.float(), final)
    with pytest.raises(TypeError, match="final_out must be Double, got Float"):
        into(scores, values, None, None, torch.empty_like(values), lse, final.float())
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        into(scores, values, None, None, torch.empty_like(values).transpose(0, 1).contiguous().transpose(0, 1),
             lse, final)
    with pytest.raises(RuntimeError, match="output out shares memory with the input values"):
        into(scores, values, None, None, values, lse, final)  # in place over an input
