#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels scripts/gpu_check.sh installs on a CUDA machine
# without network access, for its Python 3.12, when that machine lacks them: setuptools >= 77
# (the build), pybind11 (the build), expecttest (torch.library.opcheck in the tests), and, for
# a machine whose CMake is older than 3.26 (3.25 cannot compile CUDA as C++20) or that has no
# ninja, the cmake and ninja wheels (x86-64 Linux binaries; cmake is 28 MB of the 30). Run it
# wherever pip reaches PyPI:
#
#   scripts/run.sh wheels      # = scripts/gpu_wheels.sh
#
# which runs
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     setuptools==84.2.1 pybind11==3.1.0 expecttest==0.3.0 cmake==3.31.6 ninja==1.13.0
# and then checks that they install offline (pip install --no-index --find-links .whl) into a
# scratch folder. Carry .whl with the repository to the GPU machine (about 30 MB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS=(setuptools==84.2.1 pybind11==3.1.0 expecttest==0.3.0 cmake==3.31.6 ninja==1.13.0)
PYTHON="${PYTHON:-python3}"

mkdir -p .whl
for spec in "${WHEELS[@]}"; do  # one version of each: drop other versions of these names
  name="${spec%%==*}"
  find .whl -maxdepth 1 -iname "${name}-*.whl" ! -iname "${name}-${spec#*==}-*.whl" -delete
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m pip install -q --no-index --no-deps --find-links .whl --target "$scratch" "${WHEELS[@]}"
echo "== .whl holds (checked: they install offline with --no-index --find-links .whl):"
ls -l .whl
du -sh .whl
