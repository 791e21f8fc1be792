"""Builds aaren with CMake (CMakeLists.txt is the one build definition).

    pip install --no-build-isolation .

builds against the torch already installed (build isolation would fetch another).
Environment: MAX_JOBS (parallel compile jobs, default 2), TORCH_CUDA_ARCH_LIST (CUDA
architectures, default "8.0;9.0+PTX"), AAREN_CUDA (ON, OFF or AUTO), AAREN_BUILD_TESTS=1
(also build the C++ tests into build/cmake, for `ctest --test-dir build/cmake`).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
BUILD_DIR = ROOT / "build" / "cmake"


def project_version() -> str:
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r"project\(aaren VERSION ([0-9.]+)", text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # An editable install (pip install -e) runs from python/aaren: install there.
        editable = getattr(self, "editable_mode", False) or self.inplace
        package_dir = ROOT / "python" / "aaren" if editable else ext_path.parent
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_INSTALL_PREFIX={package_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DAAREN_BUILD_PYTHON=ON",
            f"-DAAREN_BUILD_TESTS={'ON' if os.environ.get('AAREN_BUILD_TESTS') == '1' else 'OFF'}",
            f"-DAAREN_CUDA={os.environ.get('AAREN_CUDA', 'AUTO')}",
        ]
        jobs = os.environ.get("MAX_JOBS", "2")
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(BUILD_DIR), "--parallel", jobs])
        subprocess.check_call(["cmake", "--install", str(BUILD_DIR)])
        if editable and ext_path.parent != package_dir:  # setuptools copies it from here
            ext_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package_dir / ext_path.name, ext_path)


setup(
    version=project_version(),
    ext_modules=[CMakeExtension("aaren._C")],
    cmdclass={"build_ext": CMakeBuild},
)
