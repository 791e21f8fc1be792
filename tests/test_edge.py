"""aaren.edge and the ExecuTorch side (docs/edge.md): the ExecuTorch kernels against the
LibTorch CPU kernels, programs exported by aaren.edge.export run by build/edge/aaren_runner
against the Python step loop, the runner linked without libtorch, and every bad input getting
a one-line error.

Needs the executorch package (scripts/run.sh installs it for the newest torch) and CMake >= 3.28
(the venv's); the runner is built into build/edge on first use. Skipped without executorch,
unless AAREN_REQUIRE_EDGE=1 (CI's newest leg), where its absence fails.
"""
import ctypes
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import aaren
from example_scripts import load_script
from naive import naive_scan
from scan_problems import mixed_scores
from tolerance import assert_close_to_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "edge"
RUNNER = BUILD / "aaren_runner"
KERNELS = BUILD / "libaaren_edge_kernels.so"

try:
    import executorch  # noqa: F401
    HAVE_EXECUTORCH = True
except ImportError:
    HAVE_EXECUTORCH = False
if not HAVE_EXECUTORCH and os.environ.get("AAREN_REQUIRE_EDGE") == "1":
    raise ImportError("AAREN_REQUIRE_EDGE=1 but executorch is not installed (scripts/run.sh edge)")
try:
    import transformers  # noqa: F401
    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False
needs_executorch = pytest.mark.skipif(not HAVE_EXECUTORCH, reason="executorch is not installed")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _cmake():
    """The venv's CMake (the executorch package's targets need >= 3.28), else PATH's."""
    local = pathlib.Path(sys.executable).parent / "cmake"
    return str(local) if local.exists() else shutil.which("cmake")


@pytest.fixture(scope="session")
def edge_build():
    """build/edge: the runner and the kernel library, built (or brought up to date) once."""
    if not HAVE_EXECUTORCH:
        pytest.skip("executorch is not installed")
    prefix = list(__import__("executorch").__path__)[0]
    # A cache another environment configured (a removed venv's cmake or ninja, another
    # executorch) is configured again from scratch.
    cmake_cache = load_script("benchmarks/cmake_cache.py", "cmake_cache")
    fresh = ["--fresh"] if cmake_cache.stale_reason(str(BUILD), {"executorch": prefix}) else []
    subprocess.run([_cmake(), "-S", str(ROOT / "csrc" / "edge"), "-B", str(BUILD), "-G", "Ninja",
                    f"-DCMAKE_PREFIX_PATH={prefix}", *fresh], check=True, capture_output=True)
    subprocess.run([_cmake(), "--build", str(BUILD), "-j2"], check=True, capture_output=True)
    return BUILD


def run_runner(*args, timeout=120):
    return subprocess.run([str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          errors="replace", timeout=timeout)


def small_encoder(width=32, heads=4, layers=2, seed=0):
    torch.manual_seed(seed)
    layer = aaren.AarenEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
    return aaren.AarenEncoder(layer, layers, norm=nn.LayerNorm(width)).eval()


def python_stream(encoder, x, prefill, chunk):
    """The outputs the runner must give (the demo's own reference: examples/edge_stream.py)."""
    return load_script("examples/edge_stream.py", "edge_stream").stream_in_python(
        encoder, x, prefill, chunk)


def runner_outputs(tmp_path, program, x, prefill, *options):
    inputs, outputs = tmp_path / "x.f32", tmp_path / "y.f32"
    x.numpy().astype("<f4").tofile(inputs)
    result = run_runner(program, "--input", inputs, "--output", outputs, "--prefill", prefill,
                        *options)
    assert result.returncode == 0, result.stderr
    assert "step latency per token" in result.stdout and "peak RSS" in result.stdout
    return torch.from_numpy(np.fromfile(outputs, dtype="<f4").reshape(x.shape)), result.stdout


def assert_relative(got, want, rtol=1e-5):
    """max |got - want| <= rtol * max |want| (float32 outputs of the same float32 model)."""
    error = (got - want).abs().max().item()
    assert error <= rtol * want.abs().max().item(), (error, want.abs().max().item())


# ---- export without executorch, and export's argument checks --------------------------------

def test_import_without_executorch_names_the_install():
    code = ("import sys; sys.modules['executorch'] = None\n"
            "import aaren, aaren.edge\n"
            "enc = aaren.AarenEncoder(aaren.AarenEncoderLayer(8, 2, 16, batch_first=True), 1)\n"
            "try:\n"
            "    aaren.edge.export(enc, 'unused.pte')\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ImportError: aaren.edge needs the executorch package" in result.stdout
    assert "pip install --no-build-isolation '.[edge]'" in result.stdout


def test_export_rejects_what_it_cannot_export(tmp_path):
    import aaren.edge
    with pytest.raises(TypeError, match="expected an aaren.AarenEncoder"):
        aaren.edge.export(nn.Linear(4, 4), tmp_path / "m.pte")
    stock = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                  enable_nested_tensor=False)
    with pytest.raises(TypeError, match="convert it with aaren.convert"):
        aaren.edge.export(stock, tmp_path / "m.pte")
    with pytest.raises(TypeError, match="must be float32"):
        aaren.edge.export(small_encoder().double(), tmp_path / "m.pte")
    with pytest.raises(ValueError, match="max_prefill must be an int >= 1"):
        aaren.edge.export(small_encoder(), tmp_path / "m.pte", max_prefill=0)
    if "transformers" in sys.modules or HAVE_TRANSFORMERS:
        import transformers
        plain = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
        with pytest.raises(TypeError, match="converted by aaren.hf.convert"):
            aaren.edge.export(plain, tmp_path / "m.pte")
    not_batch_first = aaren.AarenEncoder(aaren.AarenEncoderLayer(8, 2, 16), 1)
    with pytest.raises(ValueError, match="batch_first"):
        aaren.edge.export(not_batch_first, tmp_path / "m.pte")
    assert not (tmp_path / "m.pte").exists()


# ---- the ExecuTorch kernels against the LibTorch CPU kernels --------------------------------

class _Scan(nn.Module):
    def forward(self, scores, values, state_lse, state_out):
        return torch.ops.aaren.scan_forward(scores, values, state_lse, state_out)


class _ScanFromEmpty(nn.Module):
    def forward(self, scores, values):
        return torch.ops.aaren.scan_forward(scores, values, None, None)


class _Step(nn.Module):
    def forward(self, score, value, state_lse, state_out):
        return torch.ops.aaren.step(score, value, state_lse, state_out)


def _run_in_executorch(module, inputs, edge_build):
    """`module` exported with its aaren operators left to the kernels of
    libaaren_edge_kernels.so, run by executorch's own runtime in this process."""
    import aaren.edge
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    aaren.edge.register_out_variants()
    # The library registers its kernels with the runtime that the Python bindings load.
    ctypes.CDLL(str(edge_build / "libaaren_edge_kernels.so"), mode=ctypes.RTLD_GLOBAL)
    program = to_edge_transform_and_lower(torch.export.export(module, inputs)).to_executorch()
    loaded = Runtime.get().load_program(program.buffer)
    return loaded.load_method("forward").execute(list(inputs))


@needs_executorch
@pytest.mark.parametrize("with_state", [False, True], ids=["empty", "state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("length, head_dim", [(1, 8), (97, 13), (300, 32)])
def test_scan_kernel_matches_the_cpu_kernel(edge_build, dtype, with_state, length, head_dim):
    batch, heads = 2, 6
    scores = mixed_scores(batch, length, heads).to(dtype)
    values = torch.randn(batch, length, heads, head_dim, dtype=torch.float64).to(dtype)
    if with_state:
        state = (100 * torch.randn(batch, heads, dtype=torch.float64),
                 torch.randn(batch, heads, head_dim, dtype=torch.float64))
        state[0][0, 0] = float("-inf")  # an empty state in one lane
        module, inputs = _Scan(), (scores, values, *state)
    else:
        module, inputs = _ScanFromEmpty(), (scores, values)
    out, lse, final_out = _run_in_executorch(module, inputs, edge_build)
    cpu_out, cpu_lse, cpu_final = module(*inputs)  # the LibTorch CPU kernel
    for got, cpu in ((out, cpu_out), (lse, cpu_lse), (final_out, cpu_final)):
        assert got.dtype == cpu.dtype and got.shape == cpu.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(cpu_lse))  # masked prefixes alike
    state = (inputs[2], inputs[3]) if with_state else None
    if dtype == torch.float64:  # no coarser plain-PyTorch baseline: a fixed tolerance
        for got, cpu in ((out, cpu_out), (lse, cpu_lse), (final_out, cpu_final)):
            torch.testing.assert_close(got, cpu, rtol=1e-12, atol=1e-12)
        return
    # The suite's rule (tolerance.py): within 3x plain PyTorch's float32 error of the float64
    # reference, as the LibTorch CPU kernel itself is held.
    ref_out, ref_lse = naive_scan(scores, values, state, dtype=torch.float64)
    plain_out, plain_lse = naive_scan(scores, values, state, dtype=torch.float32)
    for got in (out, cpu_out):
        assert_close_to_reference(got, ref_out, plain_out, what=f"out, N={length}")
        assert_close_to_reference(got[:, -1], ref_out[:, -1], plain_out[:, -1],
                                  what=f"last out, N={length}")
    for got in (lse, cpu_lse):
        assert_close_to_reference(got, ref_lse, plain_lse, what=f"lse, N={length}")
    # The state after the last token, unrounded (float64).
    assert_close_to_reference(final_out, ref_out[:, -1], plain_out[:, -1], what="final_out")


@needs_executorch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_step_kernel_matches_the_cpu_kernel(edge_build, dtype):
    score = torch.tensor([[0.5, float("-inf"), 1e4], [-3.0, 2.0, 0.0]], dtype=dtype)
    value = torch.randn(2, 3, 5, dtype=torch.float64).to(dtype)
    lse = torch.tensor([[1.0, 2.0, 1e4 + 1], [float("-inf"), -1.0, 0.5]], dtype=torch.float64)
    out = torch.randn(2, 3, 5, dtype=torch.float64)
    got = _run_in_executorch(_Step(), (score, value, lse, out), edge_build)
    want = torch.ops.aaren.step(score, value, lse, out)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        # The same float64 step_token (aaren/walk.h) on both sides: the same bits.
        assert torch.equal(g, w), (g - w).abs().max()


# ---- programs through the runner ------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_program(edge_build, tmp_path_factory):
    import aaren.edge
    encoder = small_encoder()
    path = tmp_path_factory.mktemp("edge") / "encoder.pte"
    info = aaren.edge.export(encoder, path, max_prefill=16)
    return encoder, path, info


@needs_executorch
def test_export_reports_the_program(encoder_program):
    encoder, path, info = encoder_program
    assert info["path"] == str(path) and info["bytes"] == path.stat().st_size > 0
    assert (info["kind"], info["embed_dim"], info["num_layers"], info["max_prefill"]) == \
        ("encoder", 32, 2, 16)
    # Per layer lse [1, 4] and out [1, 4, 8], float64: whatever the number of tokens.
    assert info["state_bytes"] == 2 * (4 * 8 + 4 * 8 * 8)
    assert "aaren::step.out" in info["operators"]["step"]
    assert "aaren::scan_forward.out" in info["operators"]["prefill"]
    # The Linear layers went to XNNPACK: no matrix product left on the portable kernels.
    for operators in info["operators"].values():
        assert not any(op.split(".")[0] in ("aten::addmm", "aten::mm", "aten::linear")
                       for op in operators), operators


@needs_executorch
@pytest.mark.parametrize("prefill", [0, 1, 5, 16, 40, 57], ids=lambda k: f"prefill{k}")
def test_runner_equals_the_python_step_loop(encoder_program, tmp_path, prefill):
    encoder, path, _ = encoder_program
    x = torch.randn(57, 32)
    got, stdout = runner_outputs(tmp_path, path, x, prefill)
    # 40 and 57 tokens of prefill are several chunks of the program's 16.
    assert_relative(got, python_stream(encoder, x, prefill, chunk=16))
    assert f"prefill {prefill} in" in stdout


@needs_executorch
def test_runner_single_thread(encoder_program, tmp_path):
    """--single-thread: one thread in the process (no pool), the same outputs as the default
    run (the pool splits the products' rows, not their sums) and as the Python stream."""
    encoder, path, _ = encoder_program
    x = torch.randn(30, 32)
    pooled, pooled_stdout = runner_outputs(tmp_path, path, x, 5)
    single, stdout = runner_outputs(tmp_path, path, x, 5, "--single-thread")
    assert re.search(r"threads 1\n", stdout), stdout
    if (os.cpu_count() or 1) > 1:
        assert not re.search(r"threads 1\n", pooled_stdout), pooled_stdout
    assert torch.equal(single, pooled)
    assert_relative(single, python_stream(encoder, x, 5, chunk=16))


@needs_executorch
def test_runner_converted_transformer_encoder(edge_build, tmp_path):
    import aaren.edge
    torch.manual_seed(1)
    stock = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(24, 3, 48, dropout=0.0, batch_first=True), 3,
        enable_nested_tensor=False)
    model = aaren.convert(stock).eval()
    info = aaren.edge.export(model, tmp_path / "converted.pte", max_prefill=8)
    assert info["num_layers"] == 3
    x = torch.randn(20, 24)
    got, _ = runner_outputs(tmp_path, tmp_path / "converted.pte", x, 11)
    with torch.no_grad():
        want = model(x[None])[0]  # the converted model's own parallel forward
    assert_relative(got, want)


@needs_executorch
def test_runner_links_no_libtorch(edge_build):
    """Neither the runner nor any library it loads is libtorch* or libc10*."""
    import re
    listed = subprocess.run(["ldd", str(RUNNER)], capture_output=True, text=True, check=True).stdout
    loaded = [line.split()[0] for line in listed.splitlines() if line.strip()]
    readelf = shutil.which("readelf")
    needed = re.findall(r"Shared library: \[(.+?)\]", subprocess.run(
        [readelf, "-d", str(RUNNER)], capture_output=True, text=True, check=True).stdout) \
        if readelf else []
    for name in loaded + needed:
        assert not re.match(r"lib(torch|c10)", pathlib.Path(name).name), name
    assert "libexecutorch.so" in loaded and "libaaren_edge_kernels.so" in loaded
    assert not readelf or "libaaren_edge_kernels.so" in needed


def tiny_language_model(family):
    transformers = pytest.importorskip("transformers")
    import aaren.hf
    torch.manual_seed(2)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97,
                                         n_positions=256, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64, vocab_size=97)
        model = transformers.LlamaForCausalLM(config)
    return aaren.hf.convert(model).eval()


@needs_executorch
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_language_model_logits_and_greedy_generation(edge_build, tmp_path, family):
    """prefill and step give the converted model's logits (through ExecuTorch's runtime here),
    and the runner's greedy generation is generate()'s."""
    import aaren.edge
    import aaren.hf
    from executorch.runtime import Runtime
    model = tiny_language_model(family)
    info = aaren.edge.export(model, tmp_path / "lm.pte", max_prefill=8)
    assert info["kind"] == "causal_lm" and info["embed_dim"] is None and info["num_layers"] == 2
    assert "aaren::step.out" in info["operators"]["step"]

    ids = torch.randint(97, (1, 13))
    with torch.no_grad():
        want = model(ids).logits[0]  # every position's logits, one parallel forward
    ctypes.CDLL(str(KERNELS), mode=ctypes.RTLD_GLOBAL)
    program = Runtime.get().load_program(str(tmp_path / "lm.pte"))
    methods = {name: program.load_method(name) for name in ("prefill", "step", "reset")}
    for _ in range(2):  # the second stream after reset
        got = [methods["prefill"].execute([ids[:, :8]])[0][0].clone(),
               methods["prefill"].execute([ids[:, 8:10]])[0][0].clone()]
        got += [methods["step"].execute([ids[:, t:t + 1]])[0][0].clone() for t in range(10, 13)]
        assert_relative(torch.stack(got), want[[7, 9, 10, 11, 12]])
        methods["reset"].execute([])

    prompt = torch.randint(97, (1, 11))  # more than one prefill chunk
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, do_sample=False,
                                   past_key_values=aaren.hf.AarenCache(model.config))[0, 11:]
    result = run_runner(tmp_path / "lm.pte", "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
                        "--generate", 12)
    assert result.returncode == 0, result.stderr
    assert f"generated: {','.join(map(str, generated.tolist()))}" in result.stdout
    assert "p50" in result.stdout and "peak RSS" in result.stdout


@needs_executorch
def test_language_model_bad_options(edge_build, tmp_path):
    import aaren.edge
    aaren.edge.export(tiny_language_model("llama"), tmp_path / "lm.pte", max_prefill=4)
    assert_one_line_error(run_runner(tmp_path / "lm.pte", "--prompt-ids", "1,,2", "--generate", 2),
                          "--prompt-ids takes comma-separated token ids")
    assert_one_line_error(run_runner(tmp_path / "lm.pte", "--prompt-ids", "1,2"),
                          "needs both --prompt-ids and --generate")
    torch.randn(2, 4).numpy().astype("<f4").tofile(tmp_path / "x.f32")
    assert_one_line_error(run_runner(tmp_path / "lm.pte", "--input", tmp_path / "x.f32",
                                     "--output", tmp_path / "y.f32"), "not an encoder program")


# ---- bad input: one line on stderr, exit status 1 -------------------------------------------

def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("aaren_runner: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@needs_executorch
def test_bad_programs(encoder_program, tmp_path):
    _, path, _ = encoder_program
    inputs = tmp_path / "x.f32"
    torch.randn(4, 32).numpy().astype("<f4").tofile(inputs)
    args = ("--input", inputs, "--output", tmp_path / "y.f32")
    assert_one_line_error(run_runner(tmp_path / "missing.pte", *args), "no such file")
    (tmp_path / "empty.pte").write_bytes(b"")
    assert_one_line_error(run_runner(tmp_path / "empty.pte", *args), "empty")
    program = path.read_bytes()
    (tmp_path / "truncated.pte").write_bytes(program[:len(program) // 2])
    assert_one_line_error(run_runner(tmp_path / "truncated.pte", *args), "truncated.pte")
    corrupt = bytearray(program)
    corrupt[:64] = os.urandom(64)
    (tmp_path / "corrupt.pte").write_bytes(bytes(corrupt))
    assert_one_line_error(run_runner(tmp_path / "corrupt.pte", *args), "corrupt.pte")
    (tmp_path / "text.pte").write_text("not a program\n" * 100)
    assert_one_line_error(run_runner(tmp_path / "text.pte", *args), "text.pte")


@needs_executorch
def test_program_without_the_methods(edge_build, tmp_path):
    from executorch.exir import to_edge_transform_and_lower
    program = to_edge_transform_and_lower(
        torch.export.export(nn.Linear(4, 4), (torch.randn(1, 4),))).to_executorch()
    (tmp_path / "linear.pte").write_bytes(program.buffer)
    torch.randn(2, 4).numpy().astype("<f4").tofile(tmp_path / "x.f32")
    assert_one_line_error(run_runner(tmp_path / "linear.pte", "--input", tmp_path / "x.f32",
                                     "--output", tmp_path / "y.f32"),
                          "no 'prefill' method", "aaren.edge.export")


_unknown_library = None


@needs_executorch
def test_program_with_kernels_the_runner_lacks(edge_build, tmp_path):
    """A program whose methods call an operator no library in the runner implements."""
    global _unknown_library
    from executorch.exir import to_edge_transform_and_lower
    if _unknown_library is None:
        _unknown_library = torch.library.Library("aaren_edge_test", "DEF")
        _unknown_library.define("twice(Tensor x) -> Tensor")
        _unknown_library.define("twice.out(Tensor x, *, Tensor(a!) out) -> Tensor(a!)")
        _unknown_library.impl("twice", lambda x: 2 * x, "CompositeExplicitAutograd")
        _unknown_library.impl("twice.out", lambda x, *, out: out.copy_(2 * x),
                              "CompositeExplicitAutograd")

    class Twice(nn.Module):
        def forward(self, x):
            return torch.ops.aaren_edge_test.twice(x)

    programs = {name: torch.export.export(Twice(), (torch.randn(1, 4),))
                for name in ("prefill", "step", "reset")}
    program = to_edge_transform_and_lower(programs).to_executorch()
    (tmp_path / "unknown.pte").write_bytes(program.buffer)
    torch.randn(2, 4).numpy().astype("<f4").tofile(tmp_path / "x.f32")
    assert_one_line_error(run_runner(tmp_path / "unknown.pte", "--input", tmp_path / "x.f32",
                                     "--output", tmp_path / "y.f32"),
                          "does the runner have its kernels", "aaren_edge_test::twice.out")


@needs_executorch
def test_bad_inputs_and_options(encoder_program, tmp_path):
    _, path, _ = encoder_program
    out = tmp_path / "y.f32"
    (tmp_path / "ragged.f32").write_bytes(b"\0" * (4 * 32 * 3 + 4))  # 3 tokens and a float
    assert_one_line_error(run_runner(path, "--input", tmp_path / "ragged.f32", "--output", out),
                          "388 bytes is not a whole number of tokens of 32 float32")
    (tmp_path / "none.f32").write_bytes(b"")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "none.f32", "--output", out),
                          "no tokens (T = 0)")
    torch.randn(5, 32).numpy().astype("<f4").tofile(tmp_path / "x.f32")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "x.f32", "--output", out,
                                     "--prefill", 6), "--prefill 6 is more than the 5 tokens")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "missing.f32", "--output", out),
                          "cannot open the input")
    assert_one_line_error(run_runner(path, "--input", tmp_path, "--output", out),
                          "the input is not a regular file")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "x.f32", "--output", out,
                                     "--prefill", "99999999999999999999"), "--prefill takes a count")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "x.f32", "--output", out,
                                     "--prefill", 1, "--prefill", 2), "--prefill is given twice")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "x.f32", "--output", out,
                                     "--prefill", "-1"), "--prefill takes a count")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "x.f32"), "both --input and --output")
    assert_one_line_error(run_runner(path, "--input", tmp_path / "x.f32", "--output", out,
                                     "--bogus"), "unknown option --bogus")
    assert_one_line_error(run_runner(path, "--prompt-ids", "1,2", "--generate", "3"),
                          "not a language model")
    assert_one_line_error(run_runner(), "usage")
    assert not out.exists()
