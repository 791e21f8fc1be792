#!/usr/bin/env bash
# One entry point for newcomers and CI. From a fresh machine it creates the virtual
# environment, installs the pinned PyTorch and the test tools, builds aaren, and then:
#   scripts/run.sh demo    runs the main demonstration (examples/train_and_stream.py)
#   scripts/run.sh test    runs every test: pytest, then the C++ tests through CTest
#   scripts/run.sh bench   runs the CPU benchmark (benchmarks/bench_scan_cpu.py)
#   scripts/run.sh setup   only sets up and builds
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv),
# MAX_JOBS (compile jobs, default 2), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_VERSION="2.15.0"  # the one version CI pins; the package accepts 2.15.x
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"

log() { printf '\n== %s\n' "$*"; }

install_system_packages() {
  # GoogleTest for the C++ tests; Debian's packages. Only what is missing.
  local missing=()
  [ -e /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
  fi
}

setup() {
  install_system_packages
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  log "installing torch==$TORCH_VERSION and the build and test tools"
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==$TORCH_VERSION" numpy pytest hypothesis expecttest \
    pybind11 ninja "cmake>=3.24" setuptools wheel
  # The paper-claims benchmark and example: real datasets shipped inside sktime, plots, progress.
  python -m pip install -q "sktime==1.2.0" "matplotlib==3.11.2" "tqdm==4.70.1"
  log "building and installing aaren (MAX_JOBS=$MAX_JOBS, CUDA archs $TORCH_CUDA_ARCH_LIST)"
  AAREN_BUILD_TESTS=1 python -m pip install -q --no-build-isolation --no-deps .
  python -m aaren
}

run_tests() {
  log "pytest"
  python -m pytest -q
  log "C++ tests (CTest)"
  ctest --test-dir build/cmake --output-on-failure
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; log "demo"; python examples/train_and_stream.py ;;
  test) setup; run_tests ;;
  bench) setup; log "CPU benchmark"; python benchmarks/bench_scan_cpu.py "${@:2}" ;;
  *) echo "usage: scripts/run.sh {setup|demo|test|bench}" >&2; exit 2 ;;
esac
