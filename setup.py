"""Builds aaren with CMake (CMakeLists.txt is the one build definition).

    pip install --no-build-isolation .

builds against the torch already installed (build isolation would fetch another).
Environment: MAX_JOBS (parallel compile jobs, default 2), TORCH_CUDA_ARCH_LIST (CUDA
architectures, default "8.0;9.0+PTX"), AAREN_CUDA (ON, OFF or AUTO), AAREN_BUILD_TESTS=1
(also build the C++ tests, for `ctest --test-dir build/cmake`), AAREN_BUILD_DIR (the CMake
build directory, default build/cmake; relative paths are taken from this directory), so that
builds against different torch versions can keep their own.

The package needs torch >= 2.11 (the oldest version it is tested with). A built aaren is tied
to the ABI of the torch it was compiled against, so the wheel this builds requires that torch's
major.minor version (aaren also refuses another one at import).
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
BUILD_DIR = ROOT / os.environ.get("AAREN_BUILD_DIR", "build/cmake")  # an absolute path replaces ROOT
OLDEST_TORCH = "2.11"  # keep in step with pyproject.toml's build requirement and docs/development.md


def torch_requirement() -> str:
    """torch's major.minor from the build environment, else the supported range."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        installed = version("torch")
    except PackageNotFoundError:
        return f"torch>={OLDEST_TORCH}"
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", installed).groups())
    lowest = f"{major}.{minor}" if re.fullmatch(r"[\d.]+(\+.*)?", installed) else f"{major}.{minor}.0.dev0"
    return f"torch>={lowest},<{major}.{minor + 1}"


def project_version() -> str:
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r"project\(aaren VERSION ([0-9.]+)", text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        from importlib.metadata import version
        torch_version = version("torch")
        oldest = tuple(int(part) for part in OLDEST_TORCH.split("."))
        if tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups()) < oldest:
            sys.exit(f"aaren needs torch >= {OLDEST_TORCH} to build; torch {torch_version} is installed")
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
    install_requires=[torch_requirement()],
    ext_modules=[CMakeExtension("aaren._C")],
    cmdclass={"build_ext": CMakeBuild},
)
