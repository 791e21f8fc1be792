"""benchmarks/bench_soak.py (issue 28, part 4: long runs and load) in its quick mode, so that
CI runs it: a 20,000-token stream through an AarenEncoder, 300 training steps and eight
threads streaming through one module. It must pass its own hard checks (step and prefill
stay within 1e-4 of a float64 twin of the encoder, the state keeps its size, no autograd graph outlives a training step, no growth of
tracked objects, each thread's outputs bit for bit those of its stream run alone), which
are also read back here from its JSON figures. The C++ variant (examples/cpp/threads, eight
std::threads on a TorchScript copy) is built with its own CMake invocation into
build/soak/cpp-torch<major.minor> and run in its quick mode.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from example_scripts import load_script

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
def test_soak_cpp_threads_quick(tmp_path):
    """examples/cpp/threads from eight std::threads (the first run builds it: a minute or two).
    A build directory per torch version (as scripts/run.sh's AAREN_BUILD_DIR for the oldest
    leg): CI tests two torch versions in one clone, and a developer may switch; bench_soak.py
    itself configures again a directory that another environment configured."""
    torch_version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    build = os.path.join(ROOT, "build", "soak", f"cpp-torch{torch_version}")
    figures, stdout = run_soak(tmp_path, "--skip", "stream", "training", "--cpp", build, timeout=1200)
    assert figures["cpp"]["exit_status"] == 0, stdout
    assert "8 of 8 bitwise equal to one at a time" in stdout


def test_stale_cmake_cache_is_configured_again(tmp_path):
    """benchmarks/cmake_cache.py, which bench_soak.py --cpp (and the edge builds) ask before
    reusing a build directory: a cache naming a vanished cmake or ninja, another build tool or
    a package found elsewhere is stale; one that matches this environment, or none, is not."""
    cmake_cache = load_script("benchmarks/cmake_cache.py", "cmake_cache")
    tool = tmp_path / "venv" / "bin"
    tool.mkdir(parents=True)
    for name in ("cmake", "ninja"):
        (tool / name).write_text("")
    torch_dir = tmp_path / "site" / "torch" / "share" / "cmake"
    (torch_dir / "Torch").mkdir(parents=True)

    def cache(**entries):
        build = tmp_path / f"build{len(list(tmp_path.iterdir()))}"
        build.mkdir()
        lines = ["# This is the CMakeCache file.", "//the build tool"]
        lines += [f"{key}:FILEPATH={value}" for key, value in entries.items()]
        (build / "CMakeCache.txt").write_text("\n".join(lines) + "\n")
        return str(build)

    good = dict(CMAKE_COMMAND=tool / "cmake", CMAKE_MAKE_PROGRAM=tool / "ninja",
                Torch_DIR=torch_dir / "Torch")
    packages = {"Torch": str(torch_dir)}
    assert cmake_cache.stale_reason(str(tmp_path / "none"), packages) is None
    assert cmake_cache.stale_reason(cache(**good), packages, str(tool / "ninja")) is None
    vanished = dict(good, CMAKE_MAKE_PROGRAM=tmp_path / "old" / "ninja")  # a removed venv's
    gone = cmake_cache.stale_reason(cache(**vanished), packages)
    assert "CMAKE_MAKE_PROGRAM" in gone and "no longer exists" in gone
    assert "CMAKE_COMMAND" in cmake_cache.stale_reason(
        cache(**dict(good, CMAKE_COMMAND=tmp_path / "old" / "cmake")), packages)
    assert "builds with" in cmake_cache.stale_reason(cache(**good), packages, str(tool / "cmake"))
    assert "found Torch" in cmake_cache.stale_reason(
        cache(**dict(good, Torch_DIR=tmp_path / "other" / "Torch")), packages)
