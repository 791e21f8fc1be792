"""benchmarks/bench_soak.py (issue 28, part 4: long runs and load) in its quick mode, so that
CI runs it: a 20,000-token stream through an AarenEncoder, 300 training steps and eight
threads streaming through one module. It must pass its own hard checks (step and prefill
stay within 1e-4 of a float64 twin of the encoder, the state keeps its size, no autograd graph outlives a training step, no growth of
tracked objects, each thread's outputs bit for bit those of its stream run alone), which
are also read back here from its JSON figures. The C++ variant (examples/cpp/threads, eight
std::threads on a TorchScript copy) is built with its own CMake invocation into
build/soak/cpp and run in its quick mode.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_soak.py")


def run_soak(tmp_path, *args, timeout=600):
    figures = tmp_path / "soak.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the venv's cmake and ninja first, for the C++ build
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(figures), *args],
                            capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(figures.read_text()), result.stdout


def test_soak_quick(tmp_path):
    figures, stdout = run_soak(tmp_path)
    assert "all checks passed" in stdout
    stream, training, threads = figures["stream"], figures["training"], figures["threads"]
    assert stream["tokens"] == 20_000 and len(stream["state_bytes"]) == 1
    assert max(stream["step_error_by_tenth"] + stream["prefill_error_by_tenth"]) <= 1e-4
    assert training["steps"] == 300 and training["graph_tensors_max"] == 0
    assert training["loss_last"] < training["loss_first"]
    assert threads["threads"] == 8
    assert threads["variants"] and all(v["bitwise_equal"] for v in threads["variants"].values())
    assert figures["failures"] == []


def _cmake():
    local = os.path.join(os.path.dirname(sys.executable), "cmake")
    return local if os.path.exists(local) else shutil.which("cmake")


@pytest.mark.skipif(_cmake() is None, reason="CMake is not installed")
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 15),
                    reason="the C++ program is built and checked with the pinned torch (CI's "
                           "first leg); its build directory is that torch's")
def test_soak_cpp_threads_quick(tmp_path):
    """examples/cpp/threads from eight std::threads (the first run builds it: a minute or two)."""
    build = os.path.join(ROOT, "build", "soak", "cpp")
    figures, stdout = run_soak(tmp_path, "--skip", "stream", "training", "--cpp", build, timeout=1200)
    assert figures["cpp"]["exit_status"] == 0, stdout
    assert "8 of 8 bitwise equal to one at a time" in stdout
