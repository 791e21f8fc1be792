"""Reruns a test file on a lower build of the CPU kernels (AVX2, DEFAULT) than the one this
CPU selects, in a fresh process with ATEN_CPU_CAPABILITY lowered: aaren lowers its choice of
kernels as PyTorch does (csrc/ops/cpu/scan_cpu.cpp), so the file's tests then run that build."""
import os
import subprocess
import sys

import pytest
import torch

import aaren

CAPABILITIES = ["avx2", "default"]


def rerun_on(capability, test_file, skip_pattern):
    """Runs `test_file` but its tests matching `skip_pattern` (the caller, which would recurse)
    with ATEN_CPU_CAPABILITY=capability; skips where this platform has no such build or this
    CPU cannot run it, and fails unless the build is the one selected and every test passes."""
    native = torch.backends.cpu.get_cpu_capability()
    if capability.upper() not in aaren.build_info()["cpu_isas_compiled"].split(","):
        pytest.skip(f"no {capability.upper()} build on this platform")
    if capability == "avx2" and not native.startswith(("AVX2", "AVX512")):
        pytest.skip(f"this CPU runs {native}, below AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    selected = subprocess.run(
        [sys.executable, "-c", "import aaren; print(aaren.build_info()['cpu_isa_selected'])"],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert selected == capability.upper()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
         "-k", f"not {skip_pattern}"],
        env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
