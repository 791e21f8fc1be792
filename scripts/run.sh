#!/usr/bin/env bash
# One entry point for newcomers and CI. From a fresh machine it creates the virtual
# environment, installs the pinned PyTorch and the test tools, builds aaren, and then:
#   scripts/run.sh demo         runs the main demonstration (examples/train_and_stream.py)
#   scripts/run.sh test         runs every test: pytest, the C++ tests through CTest, the demo
#                               (it checks streaming against the parallel forward) and the CPU
#                               benchmark's smoke mode; newest supported torch ($TORCH_VERSION)
#   scripts/run.sh test-oldest  the oldest supported torch ($OLDEST_TORCH_VERSION) in its own
#                               venv (.venv-torch2.11) and build directory, a CPU-only build,
#                               and the pytest suite
#   scripts/run.sh sanitize     builds aaren and the C++ tests with AddressSanitizer and
#                               UndefinedBehaviorSanitizer (build/sanitize, CPU only) and runs
#                               CTest (the CUDA emulation included) and the operators' pytest
#                               files against that build; newest torch only
#   scripts/run.sh edge         ExecuTorch: installs executorch (only what export uses), builds
#                               build/edge/aaren_runner (no libtorch) and checks it on a demo
#                               model (examples/edge_stream.py); newest torch only
#   scripts/run.sh bench        runs the CPU benchmark (benchmarks/bench_scan_cpu.py)
#   scripts/run.sh setup        only sets up and builds
#   scripts/run.sh gpu [OUT]    on a CUDA machine: scripts/gpu_check.sh (build for its GPU,
#                               GPU tests, compute-sanitizer, deploy tests, CUDA benchmark);
#                               no network needed there, uses that machine's python3 and torch
#   scripts/run.sh wheels       fills .whl/ with the wheels gpu_check.sh may need there
# .ci/run runs `test` (which includes `edge`'s install, build and check), `sanitize`, then
# `test-oldest`.
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv),
# TORCH_VERSION (default the pinned newest, below), AAREN_BUILD_DIR (CMake build directory,
# default build/cmake), MAX_JOBS (compile jobs, default 2), TORCH_CUDA_ARCH_LIST (default
# "8.0;9.0+PTX"), AAREN_CUDA (ON, OFF or AUTO: CUDA kernels whenever nvcc is found).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

case "${1:-}" in  # these two set nothing up here (and take none of the defaults below)
  gpu) exec scripts/gpu_check.sh "${@:2}" ;;
  wheels) exec scripts/gpu_wheels.sh "${@:2}" ;;
esac

NEWEST_TORCH_VERSION="2.15.0"  # the newest torch CI tests (the whole suite, CUDA kernels built)
OLDEST_TORCH_VERSION="2.11.0"  # the oldest torch the package accepts (pyproject.toml); CI builds and tests it too
TORCH_VERSION="${TORCH_VERSION:-$NEWEST_TORCH_VERSION}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
export AAREN_BUILD_DIR="${AAREN_BUILD_DIR:-build/cmake}"
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
export AAREN_CUDA="${AAREN_CUDA:-AUTO}"
AAREN_BUILD_TESTS="${AAREN_BUILD_TESTS:-1}"  # the C++ tests (GoogleTest): CTest runs them
EXECUTORCH_VERSION="1.5.1"  # aaren.edge's (python/aaren/edge.py); tested with the newest torch

# No pip cache: it would keep a second copy of the ~3 GB of torch and CUDA wheels, and a fresh
# machine's disk (CI's included) may be small. (pip reads any value of this variable as "off".)
export PIP_NO_CACHE_DIR=1
NEEDED_DISK_GB=7  # a venv with the CUDA build of torch from PyPI and the test tools is ~6.1 GB, plus a wheel in flight

log() { printf '\n== %s\n' "$*"; }

check_disk() {  # check_disk DIR: say so up front when DIR's filesystem looks too full for a venv
  local dir="$1" free_kb
  while [ ! -e "$dir" ]; do dir="$(dirname "$dir")"; done
  free_kb="$(df -Pk "$dir" | awk 'NR == 2 {print $4}')"
  log "disk: $(( free_kb / 1048576 )) GB free where $VENV goes"
  if [ "$free_kb" -lt $(( NEEDED_DISK_GB * 1048576 )) ]; then
    # A warning, not a stop: pip reports the real shortage ("No space left on device") if it comes.
    echo "warning: a venv with torch $TORCH_VERSION takes about $NEEDED_DISK_GB GB; if pip runs out of" \
      "space, free some (or point VENV at a larger disk) and rerun" >&2
  fi
}

install_system_packages() {
  # GoogleTest for the C++ tests; Debian's packages. Only what is missing.
  local missing=()
  [ "$AAREN_BUILD_TESTS" != 1 ] || [ -e /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
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
    check_disk "$VENV"
    log "creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  log "installing torch==$TORCH_VERSION and the build and test tools into $VENV"
  python -m pip install -q --upgrade pip
  # setuptools >= 77: pyproject.toml's license field (a fresh venv may have an older one).
  python -m pip install -q "torch==$TORCH_VERSION" numpy pytest hypothesis expecttest \
    "pybind11>=2.12" ninja "cmake>=3.28" "setuptools>=77"
  # The paper-claims benchmark and example: real datasets shipped inside sktime, plots, progress.
  python -m pip install -q "sktime==1.2.0" "matplotlib==3.11.2" "tqdm==4.70.1"
  # aaren.hf and its tests (tests/test_hf.py): the pinned transformers (pyproject's [hf] extra).
  python -m pip install -q "transformers==5.23.0"
  # The TSLib-protocol benchmarks (examples/forecast.py, examples/classify_uea.py): already
  # pulled in by sktime; pinned so that the CSV reading and the validation split stay the same.
  python -m pip install -q "pandas==3.0.6" "scikit-learn==1.9.1"
  # The offline-RL example's smoke test (tests/test_rl.py; pyproject's [rl] extra): MuJoCo
  # environments and the SAC behaviour policy. Pinned: the versions the results were made with.
  python -m pip install -q "gymnasium[mujoco]==1.4.0" "mujoco==4.0.1" "stable-baselines3==2.9.2"
  log "building and installing aaren (torch $TORCH_VERSION, build dir $AAREN_BUILD_DIR, MAX_JOBS=$MAX_JOBS, CUDA $AAREN_CUDA, archs $TORCH_CUDA_ARCH_LIST)"
  AAREN_BUILD_TESTS="$AAREN_BUILD_TESTS" python -m pip install -q --no-build-isolation --no-deps .
  python -m aaren
}

install_edge() {
  # executorch without its declared dependencies (coremltools, scikit-learn, hydra-core, ...:
  # other backends and its LLM tooling); export uses only these four besides torch. Pinned:
  # the versions CI tests. (The edge extra, pip install '.[edge]', brings the whole set instead.)
  log "installing executorch==$EXECUTORCH_VERSION (export's dependencies only) into $VENV"
  python -m pip install -q --no-deps "executorch==$EXECUTORCH_VERSION" "torchao==0.18.0" \
    "flatbuffers==25.12.19" "ruamel.yaml==0.19.1" "tabulate==0.10.0"
}

build_edge() {
  # CMake from the venv: the executorch package's CMake targets need >= 3.28.
  log "building build/edge/aaren_runner and the ExecuTorch kernels (no libtorch)"
  local prefix
  prefix="$(python -c 'import executorch; print(list(executorch.__path__)[0])')"
  # A cache another environment configured (a removed venv's cmake or ninja) is configured anew.
  local fresh=()
  python benchmarks/cmake_cache.py build/edge "executorch=$prefix" || fresh=(--fresh)
  "$VENV/bin/cmake" -S csrc/edge -B build/edge -G Ninja -DCMAKE_PREFIX_PATH="$prefix" "${fresh[@]}" >/dev/null
  "$VENV/bin/cmake" --build build/edge -j "$MAX_JOBS"
}

check_edge() {
  log "edge demo (examples/edge_stream.py: the runner's outputs must equal Python's streaming)"
  python examples/edge_stream.py
}

smoke_edge_benchmark() {
  log "edge benchmark, smoke mode (benchmarks/bench_edge.py: checks every program's outputs)"
  python benchmarks/bench_edge.py --smoke
}

run_tests() {
  log "pytest"
  AAREN_REQUIRE_EDGE=1 python -m pytest -q
  log "C++ tests (CTest)"
  ctest --test-dir "$AAREN_BUILD_DIR" --output-on-failure
  log "demo (examples/train_and_stream.py: streaming must equal the parallel forward)"
  python examples/train_and_stream.py
  log "CPU benchmark, smoke mode (tiny sizes; checks outputs and figures)"
  python benchmarks/bench_scan_cpu.py --smoke
  log "context parallelism: 2 processes (the loss curve must follow one process's), benchmark smoke mode"
  python -m torch.distributed.run --nproc-per-node 2 examples/train_context_parallel.py
  python benchmarks/bench_context_parallel.py --smoke
  log "step latency benchmark, smoke mode (checks that it runs)"
  python benchmarks/bench_step_cpu.py --smoke
  log "packed vs padded benchmark, smoke mode (checks the packed outputs against the padded)"
  python benchmarks/bench_varlen.py --smoke
}

timed() {  # timed NAME COMMAND...: runs it and reports its wall time
  local start=$SECONDS
  "${@:2}"
  log "$1 took $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
}

newest() {
  setup
  install_edge
  build_edge
  run_tests
  check_edge
  smoke_edge_benchmark
}

oldest() {
  # Lean: no CUDA kernels (they are compiled against the newest torch in `test`), no C++ tests.
  TORCH_VERSION="$OLDEST_TORCH_VERSION"
  VENV="$ROOT/.venv-torch${OLDEST_TORCH_VERSION%.*}"
  AAREN_BUILD_DIR="build/torch${OLDEST_TORCH_VERSION%.*}"
  AAREN_CUDA=OFF
  AAREN_BUILD_TESTS=0
  setup
  log "pytest (torch $OLDEST_TORCH_VERSION, CPU-only build)"
  python -m pytest -q
}

# scripts/run.sh sanitize: AddressSanitizer and UndefinedBehaviorSanitizer (docs/development.md,
# "Sanitizers"). Its own CMake build directory (CPU only: the CUDA kernels run sanitized under
# the host emulation); the sanitized package is laid out in $SANITIZE_BUILD_DIR/python, which
# the Python tests import (PYTHONPATH) instead of the installed aaren, under libasan (LD_PRELOAD).
SANITIZE_BUILD_DIR="build/sanitize"
SANITIZERS="address,undefined"
# The Python tests that run sanitized: those that call the operators' C++ (CPU kernels, autograd,
# the step, the state; the lower instruction sets are rerun in subprocesses, sanitized too).
SANITIZE_PYTESTS=(tests/test_scan_*.py tests/test_cpu_*.py tests/test_attention_step.py
  tests/test_state.py tests/test_step_fast.py)

build_sanitized() {
  local dir="$ROOT/$SANITIZE_BUILD_DIR"
  log "building aaren and the C++ tests with -fsanitize=$SANITIZERS in $SANITIZE_BUILD_DIR (CPU only, MAX_JOBS=$MAX_JOBS)"
  cmake -S "$ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python)" \
    -DCMAKE_INSTALL_PREFIX="$dir/python/aaren" -DAAREN_BUILD_PYTHON=ON -DAAREN_BUILD_TESTS=ON \
    -DAAREN_CUDA=OFF -DAAREN_SANITIZE="$SANITIZERS" >/dev/null
  cmake --build "$dir" -j "$MAX_JOBS"
  # An importable copy of the package: its Python sources, the sanitized build installed beside them.
  rm -rf "$dir/python"
  python -c 'import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns(
    "__pycache__", "*.so", "lib", "include", "share", "_build_config.py"))' python/aaren "$dir/python/aaren"
  cmake --install "$dir" >/dev/null
}

run_sanitized_tests() {
  local dir="$ROOT/$SANITIZE_BUILD_DIR" preload
  # Every finding stops the program with its stack (-fno-sanitize-recover=all, halt_on_error).
  export ASAN_OPTIONS="halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
  log "C++ tests under the sanitizers (CTest: the C++ tests, the CUDA kernels under emulation)"
  ctest --test-dir "$dir" --output-on-failure -j "$MAX_JOBS"
  # python is not instrumented: the AddressSanitizer runtime the library links must be loaded
  # first, and with it libstdc++, whose __cxa_throw it intercepts (preloaded alone, it finds no
  # libstdc++ yet and aborts at the first C++ exception: "CHECK failed ... real___cxa_throw").
  # CPython keeps memory until exit by design: no leak check.
  local lib="$dir/python/aaren/lib/libaaren_ops.so" asan stdcxx
  asan="$(ldd "$lib" | awk '$1 ~ /^libasan\.so/ {print $3}')"
  stdcxx="$(ldd "$lib" | awk '$1 ~ /^libstdc\+\+\.so/ {print $3}')"
  [ -f "$asan" ] && [ -f "$stdcxx" ] || { echo "error: ldd $lib names no libasan or libstdc++" >&2; exit 1; }
  preload="$asan $stdcxx"
  log "pytest under the sanitizers: the operators' tests (LD_PRELOAD=$preload)"
  # --capture=sys: a sanitizer's report goes to the real stderr (pytest's default capture of
  # file descriptor 2 would swallow it with the process).
  LD_PRELOAD="$preload" PYTHONPATH="$dir/python" ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" \
    python -c 'import aaren; print("aaren from", aaren.__file__, "sanitizers", aaren.build_info()["sanitizers"]);
assert aaren.build_info()["sanitizers"], "not the sanitized build"'
  LD_PRELOAD="$preload" PYTHONPATH="$dir/python" ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" \
    python -m pytest -q --capture=sys -p no:cacheprovider "${SANITIZE_PYTESTS[@]}"
}

sanitize() {
  setup  # the venv, its tools and GoogleTest (and the regular build, whose aaren CTest's helper imports)
  timed "sanitized build" build_sanitized
  timed "sanitized tests" run_sanitized_tests
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; log "demo"; python examples/train_and_stream.py ;;
  edge) setup; install_edge; build_edge; check_edge ;;
  test) timed "test (torch $TORCH_VERSION)" newest ;;
  test-oldest) timed "test-oldest (torch $OLDEST_TORCH_VERSION)" oldest ;;
  sanitize) timed "sanitize (torch $TORCH_VERSION)" sanitize ;;
  bench) setup; log "CPU benchmark"; python benchmarks/bench_scan_cpu.py "${@:2}" ;;
  *) echo "usage: scripts/run.sh {setup|demo|test|test-oldest|sanitize|edge|bench|gpu [OUT] [--dry-run|--cpu-plumbing]|wheels}" >&2; exit 2 ;;
esac
