"""Whether a CMake build directory's cache can be reused by this interpreter's environment.

A CMake cache keeps absolute paths: the cmake and ninja that configured it (CMAKE_COMMAND,
CMAKE_MAKE_PROGRAM) and each package found (Torch_DIR, aaren_DIR, executorch_DIR). A build
directory kept while the virtual environment that configured it was removed or replaced (CI
removes the newest torch's venv before testing the oldest in the same clone; a developer
recreates .venv) then fails to build ("ninja: not found" from the vanished venv), and one
configured with another torch keeps compiling and linking against that torch. The scripts that
build their own CMake projects (benchmarks/bench_soak.py --cpp, benchmarks/bench_edge.py,
tests/test_edge.py, scripts/run.sh edge) ask `stale_reason` first and reconfigure from scratch
(``cmake --fresh``, CMake >= 3.24, which every project here requires) when it gives a reason.

    python benchmarks/cmake_cache.py BUILD_DIR [PACKAGE=PREFIX ...]

prints the reason and exits with status 1 when BUILD_DIR's cache is stale, 0 otherwise.
"""
import os
import sys
from typing import Dict, Optional


def cache_entries(build_dir: str) -> Dict[str, str]:
    """CMakeCache.txt's entries (NAME:TYPE=VALUE lines), by name; {} when there is none."""
    entries = {}
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt"), encoding="utf-8",
                  errors="replace") as cache:
            for line in cache:
                if line.startswith(("#", "//")) or "=" not in line:
                    continue
                key, value = line.rstrip("\n").split("=", 1)
                entries[key.split(":", 1)[0]] = value
    except FileNotFoundError:
        pass
    return entries


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _under(path: str, prefix: str) -> bool:
    path, prefix = os.path.realpath(path), os.path.realpath(prefix)
    return path == prefix or path.startswith(prefix.rstrip(os.sep) + os.sep)


def stale_reason(build_dir: str, packages: Optional[Dict[str, str]] = None,
                 make_program: Optional[str] = None) -> Optional[str]:
    """Why build_dir's cache must not be reused, or None (no cache at all is not stale).

    packages: name -> the prefix this environment provides the package under (e.g.
    {"Torch": torch.utils.cmake_prefix_path}); a cache whose <name>_DIR lies elsewhere is
    stale. make_program: the build tool this run would use (this environment's ninja), which
    the cache must name if given."""
    entries = cache_entries(build_dir)
    if not entries:
        return None
    for tool in ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM"):
        path = entries.get(tool)
        if path and not os.path.exists(path):
            return f"its {tool} {path} no longer exists"
    cached_make = entries.get("CMAKE_MAKE_PROGRAM")
    if make_program and cached_make and not _same_file(cached_make, make_program):
        return f"it builds with {cached_make}, not {make_program}"
    for name, prefix in (packages or {}).items():
        found = entries.get(f"{name}_DIR")
        if found and not _under(found, prefix):
            return f"it found {name} in {found}, not under {prefix}"
    return None


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        return 0 if argv else 2
    packages = dict(arg.split("=", 1) for arg in argv[1:])
    reason = stale_reason(argv[0], packages)
    if reason:
        print(f"{argv[0]}: stale CMake cache: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
