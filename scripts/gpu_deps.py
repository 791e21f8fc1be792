"""The Python packages scripts/gpu_check.sh needs beside the machine's own torch: installs the
missing or too old ones from a folder of wheels (no network) into a scratch folder that goes on
PYTHONPATH, and fails clearly when a wheel is missing.

    python3 scripts/gpu_deps.py --wheels .whl --target /tmp/aaren-gpu-check/site

Installed from .whl when absent or too old (scripts/run.sh wheels downloads them):
setuptools >= 77 (pyproject.toml's license field), pybind11 >= 2.12 (the extension module),
expecttest (torch.library.opcheck in the tests); the cmake wheel when the `cmake` on PATH is
older than 3.26 (3.25 cannot compile CUDA as C++20) or missing, the ninja wheel when there is no
`ninja` (their commands land in TARGET/bin, which scripts/gpu_check.sh puts first on PATH).
Only checked: torch, pytest, hypothesis, numpy (the machine must have them).
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

INSTALLABLE = {"setuptools": (77,), "pybind11": (2, 12), "expecttest": ()}
TOOLS = {"cmake": (3, 26), "ninja": ()}  # commands on PATH, installable from wheels of those names
REQUIRED = ["torch", "pytest", "hypothesis", "numpy"]


def tool_version(name):
    path = shutil.which(name)
    if path is None:
        return None, None
    try:
        output = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return path, None
    match = re.search(r"\d+(\.\d+)+", output)
    return path, match.group(0) if match else None


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def at_least(found, minimum):
    numbers = tuple(int(n) for n in re.findall(r"\d+", found.split("+")[0])[:len(minimum)])
    return numbers >= minimum


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", default=".whl")
    parser.add_argument("--target", required=True)
    args = parser.parse_args()
    problems = []
    for name in REQUIRED:
        found = installed(name)
        print(f"{name:12s} {found or 'MISSING'}")
        if not found:
            problems.append(f"{name} is not installed for {sys.executable} (and is not carried as a wheel)")
    wanted = []

    def check(name, found, minimum, where=""):
        """Prints what was found; queues the newest wheel of `name` when it is missing or too old."""
        ok = found is not None and at_least(found, minimum)
        need = ">=" + ".".join(map(str, minimum)) if minimum else "any version"
        print(f"{name:12s} {found or 'MISSING'} ({where}needs {need}){'' if ok else ': install from ' + args.wheels}")
        if ok:
            return
        wheels = sorted(glob.glob(os.path.join(args.wheels, f"{name}-*.whl")))
        if wheels:
            wanted.append(wheels[-1])
        else:
            problems.append(f"no usable {name} and no {name} wheel in {args.wheels}/: run "
                            f"`scripts/run.sh wheels` where PyPI is reachable and carry {args.wheels}/")

    for name, minimum in INSTALLABLE.items():
        check(name, installed(name), minimum)
    for name, minimum in TOOLS.items():
        path, found = tool_version(name)
        check(name, found, minimum, f"{path or 'not on PATH'}; ")
    if problems:
        for problem in problems:
            print(f"gpu_deps: {problem}")
        return 1
    if wanted:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", args.target, *wanted]
        print(" ".join(command), flush=True)
        return subprocess.call(command)
    print("gpu_deps: nothing to install")
    return 0


if __name__ == "__main__":
    sys.exit(main())
