#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on any CUDA machine, with no network:
#
#   scripts/gpu_check.sh [OUT_DIR]          (also: scripts/run.sh gpu [OUT_DIR])
#
# It uses that machine's own python3 and torch (nothing is downloaded) and runs these steps,
# each under its own time limit (timeout) and all of them within GPU_CHECK_BUDGET seconds
# (default 540):
#   deps       the Python packages the build and tests need and python3 lacks (setuptools >= 77,
#              pybind11, expecttest; cmake >= 3.26 and ninja if the machine's are missing or
#              older), installed from the wheels in .whl/ (scripts/run.sh wheels fills it) into a
#              scratch folder on PYTHONPATH and PATH: python3's own packages stay as they are
#   build      aaren for this GPU's architecture only (torch.cuda.get_device_capability), CUDA
#              kernels required, all cores, into that scratch folder (pip --target), build dir build/gpu
#   bench      python benchmarks/bench_scan_cuda.py --quick, on a quiet machine (fails on a
#              CUDA-vs-CPU MISMATCH)
#   deploy     the deployment CTest cases (tests/deploy; the CUDA ones must run, not skip), mostly
#              CPU work, in the background while the four steps below run one after another
#   test_cuda  pytest tests/test_cuda.py (CUDA against the CPU kernels, chunked paths, streams,
#              CUDA graphs, torch.compile reduce-overhead)
#   memcheck   compute-sanitizer --tool memcheck on scripts/gpu_sanitize.py (every kernel variant,
#   racecheck  and --tool racecheck      the split-N paths; aaren's kernels instrumented only)
#   suite      the whole pytest suite with the `device` fixture on cuda only (AAREN_TEST_DEVICES=cuda),
#              tests/test_hf.py skipped where transformers is not installed (the GPU machine is offline),
#              in GPU_SUITE_WORKERS (4) processes where pytest-xdist is installed
# Logs and the benchmark tables go to OUT_DIR (default $OUT, else build/gpu-check; 8 files at
# most): summary.txt, build.log, test_cuda.log, memcheck.log, racecheck.log, bench_cuda.md,
# suite.log, deploy.log. The summary (which steps passed, failed, timed out or were skipped) is
# printed last. Exit status: 0 when every step passed, 1 otherwise, 2 when it cannot run at all.
#
#   --dry-run       print the plan (steps, commands, time limits) and what is found; run nothing
#   --cpu-plumbing  without a GPU: the same steps against a CPU-only build (GPU steps skipped,
#                   the suite and deploy cases on the CPU, the CPU benchmark's smoke mode instead),
#                   to check this script itself
# Environment: GPU_PYTHON (default python3), GPU_CHECK_BUDGET (seconds, default 540),
# GPU_CHECK_SLOWDOWN (multiplies every step's time limit; default 1, 6 with --cpu-plumbing,
# whose CPU build on a small machine takes far longer than on a 16-core GPU machine),
# GPU_CHECK_WORK (scratch folder, default /tmp/aaren-gpu-check), MAX_JOBS (default: all cores),
# GPU_BENCH_ARGS (default --quick), GPU_SUITE_WORKERS (default 4).
set -uo pipefail
{  # the whole script is read before it runs: editing it during a run cannot change that run

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=gpu
DRY=0
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --cpu-plumbing) MODE=plumbing ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
OUT_DIR="${OUT_DIR:-${OUT:-$ROOT/build/gpu-check}}"
PY="${GPU_PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
WORK="${GPU_CHECK_WORK:-/tmp/aaren-gpu-check}"
SITE="$WORK/site"
JOBS="${MAX_JOBS:-$(nproc)}"
BENCH_ARGS="${GPU_BENCH_ARGS:---quick}"
SUITE_WORKERS="${GPU_SUITE_WORKERS:-4}"  # pytest-xdist processes for the suite, where it is installed
BUILD_DIR="build/gpu"
DEPLOY_DIR="build/gpu-deploy"
START=$SECONDS

# ---- what is there -------------------------------------------------------------------
probe() {  # prints KEY=VALUE lines about python3, torch and the GPU
  "$PY" - <<'EOF' 2>/dev/null
import sys
print(f"PYTHON_VERSION={sys.version.split()[0]}")
print(f"PYTHON_PATH={sys.executable}")
try:
    import torch
except Exception as error:
    print(f"TORCH=none ({type(error).__name__})")
    raise SystemExit
print(f"TORCH={torch.__version__}")
try:
    import xdist  # noqa: F401  (pytest-xdist: the whole suite in parallel processes)
    print("XDIST=1")
except ImportError:
    pass
print(f"TORCH_CUDA={torch.version.cuda}")
available = torch.cuda.is_available()
print(f"GPU_AVAILABLE={int(available)}")
if available:
    major, minor = torch.cuda.get_device_capability(0)
    print(f"GPU_ARCH={major}.{minor}")
    print(f"GPU_NAME={torch.cuda.get_device_name(0).replace(' ', '_')}")
EOF
}
declare -A FOUND=()
while IFS='=' read -r key value; do FOUND[$key]="$value"; done < <(probe)
TORCH="${FOUND[TORCH]:-none (no $PY)}"
GPU_AVAILABLE="${FOUND[GPU_AVAILABLE]:-0}"
GPU_ARCH="${FOUND[GPU_ARCH]:-}"
tool() { command -v "$1" >/dev/null 2>&1 && echo "$(command -v "$1")" || echo "missing"; }
NVCC="$(tool nvcc)"
[ "$NVCC" != missing ] || { [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc && export PATH="/usr/local/cuda/bin:$PATH"; }
SANITIZER="$(tool compute-sanitizer)"
[ "$SANITIZER" != missing ] || { [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer; }

if [ "$MODE" = plumbing ]; then
  AAREN_CUDA_SETTING=OFF
  TEST_DEVICES=cpu
  ARCH_LIST=""
else
  AAREN_CUDA_SETTING=ON
  TEST_DEVICES=cuda
  ARCH_LIST="${GPU_ARCH:-?}"
fi

# ---- the steps ------------------------------------------------------------------------
# name | time limit (s) | log file | what it runs (bash, in the repository root)
STEPS=(deps build bench deploy test_cuda memcheck racecheck suite)  # deploy runs beside the four after it
declare -A LIMIT=([deps]=90 [build]=330 [test_cuda]=150 [memcheck]=150 [racecheck]=150
                  [bench]=150 [suite]=300 [deploy]=330)
SLOWDOWN="${GPU_CHECK_SLOWDOWN:-$([ "$MODE" = plumbing ] && echo 6 || echo 1)}"
for step in "${!LIMIT[@]}"; do LIMIT[$step]=$(( LIMIT[$step] * SLOWDOWN )); done
declare -A LOG=([deps]=build.log [build]=build.log [test_cuda]=test_cuda.log [memcheck]=memcheck.log
                [racecheck]=racecheck.log [bench]=bench_cuda.md [suite]=suite.log [deploy]=deploy.log)
# compute-sanitizer instruments aaren's kernels only (forward_chunk_kernel, backward_chunk_kernel);
# torch's caching allocator is off so that an access past a tensor's end is not hidden in a cached block.
SANITIZE_CMD="PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool TOOL --kernel-name kns=chunk_kernel --error-exitcode 1 --report-api-errors no --print-limit 50 '$PY' scripts/gpu_sanitize.py"
declare -A CMD=(
  [deps]="'$PY' scripts/gpu_deps.py --wheels .whl --target '$SITE'"
  [build]="TORCH_CUDA_ARCH_LIST='$ARCH_LIST' AAREN_CUDA=$AAREN_CUDA_SETTING MAX_JOBS=$JOBS AAREN_BUILD_DIR=$BUILD_DIR '$PY' -m pip install -v --no-build-isolation --no-deps --no-index --upgrade --target '$SITE' . && '$PY' -m aaren"
  [test_cuda]="'$PY' -m pytest -q -p no:cacheprovider tests/test_cuda.py"
  [memcheck]="${SANITIZE_CMD/TOOL/memcheck}"
  [racecheck]="${SANITIZE_CMD/TOOL/racecheck --racecheck-report hazard}"
  [bench]="'$PY' benchmarks/bench_scan_cuda.py $BENCH_ARGS"
  [suite]="AAREN_TEST_DEVICES=$TEST_DEVICES AAREN_ALLOW_NO_HF=1 '$PY' -m pytest -q -p no:cacheprovider ${FOUND[XDIST]:+-n $SUITE_WORKERS }--ignore tests/test_cuda.py"
  [deploy]="cmake -S scripts/gpu_deploy -B $DEPLOY_DIR -DAAREN_SOURCE_DIR='$ROOT' -DPython_EXECUTABLE='${FOUND[PYTHON_PATH]:-$PY}' >/dev/null && ctest --test-dir $DEPLOY_DIR -L deploy --output-on-failure -j 3"
)
if [ "$MODE" = plumbing ]; then
  CMD[bench]="'$PY' benchmarks/bench_scan_cpu.py --smoke"
fi

# ---- dry run -------------------------------------------------------------------------
print_plan() {
  echo "gpu_check plan ($MODE mode), within $BUDGET s; logs to $OUT_DIR"
  [ "$MODE" = gpu ] || echo "  (--cpu-plumbing: a CPU-only build; memcheck and racecheck are skipped; bench is bench_scan_cpu.py --smoke)"
  echo "  python3: $PY -> ${FOUND[PYTHON_PATH]:-not found} (Python ${FOUND[PYTHON_VERSION]:-?}), torch $TORCH (CUDA ${FOUND[TORCH_CUDA]:-?})"
  echo "  GPU: $([ "$GPU_AVAILABLE" = 1 ] && echo "${FOUND[GPU_NAME]:-?}, compute capability $GPU_ARCH" || echo "none visible to torch")"
  echo "  nvcc: $NVCC; compute-sanitizer: $SANITIZER; cmake: $(tool cmake); ninja: $(tool ninja); ctest: $(tool ctest)"
  echo "  wheels in .whl: $(ls .whl/*.whl 2>/dev/null | xargs -n1 basename 2>/dev/null | tr '\n' ' ' || true)"
  ls .whl/*.whl >/dev/null 2>&1 || echo "  (none: run 'scripts/run.sh wheels' where PyPI is reachable, then carry .whl/)"
  echo "  scratch folder (PYTHONPATH): $SITE; compile jobs: $JOBS"
  for step in "${STEPS[@]}"; do
    printf '  %-10s limit %4s s  > %-14s %s\n' "$step" "${LIMIT[$step]}" "${LOG[$step]}" "${CMD[$step]}"
  done
  echo "  (deploy runs in the background beside test_cuda, memcheck, racecheck and suite)"
}
if [ "$DRY" = 1 ]; then
  print_plan
  if [ "$MODE" = gpu ] && [ "$GPU_AVAILABLE" != 1 ]; then
    echo "(no GPU here: a real run would refuse; --cpu-plumbing runs the non-GPU steps)"
  fi
  exit 0
fi

# ---- refuse without what a GPU run needs ---------------------------------------------
if [ "$MODE" = gpu ]; then
  problems=()
  if [ "${TORCH%% *}" = none ]; then
    problems+=("$PY cannot import torch")
  elif [ "$GPU_AVAILABLE" != 1 ]; then
    problems+=("torch $TORCH (CUDA ${FOUND[TORCH_CUDA]:-none}) sees no CUDA GPU")
  fi
  [ "$NVCC" != missing ] || problems+=("nvcc (the CUDA compiler) is not on PATH or in /usr/local/cuda/bin")
  if [ ${#problems[@]} -gt 0 ]; then
    echo "gpu_check: refusing to run: $(printf '%s; ' "${problems[@]}" | sed 's/; $//')." >&2
    echo "gpu_check: it needs a CUDA GPU, a CUDA build of torch and nvcc. Use --dry-run to see the plan," >&2
    echo "gpu_check: or --cpu-plumbing to run the steps that need no GPU against a CPU-only build." >&2
    exit 2
  fi
fi

# ---- run -----------------------------------------------------------------------------
mkdir -p "$OUT_DIR" "$SITE" "$WORK/bin"
rm -rf "$WORK/inductor"
rm -f "$OUT_DIR"/{summary.txt,build.log,test_cuda.log,memcheck.log,racecheck.log,bench_cuda.md,suite.log,deploy.log} "$WORK/deploy.status"
# `python` for the deploy test's README commands: the interpreter this script uses.
printf '#!/bin/sh\nexec "%s" "$@"\n' "${FOUND[PYTHON_PATH]}" > "$WORK/bin/python"
chmod +x "$WORK/bin/python"
# The scratch folder's commands (cmake, ninja from .whl, if needed) first, then the Python's own.
export PATH="$WORK/bin:$SITE/bin:$(dirname "${FOUND[PYTHON_PATH]}"):$PATH"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="$ARCH_LIST"  # also for the deploy test's CMake (find_package(Torch))

declare -A STATUS=() SECS=()
failed_build=0
run_step() {
  local step="$1" log="$OUT_DIR/${LOG[$1]}"
  local remaining=$(( BUDGET - (SECONDS - START) ))
  local limit=${LIMIT[$step]}
  (( limit <= remaining - 15 )) || limit=$(( remaining - 15 ))  # 10 s for --kill-after, 5 for the summary
  if [ "$failed_build" = 1 ]; then STATUS[$step]="skipped (no build)"; return; fi
  if (( limit < 20 )); then STATUS[$step]="skipped (budget of $BUDGET s used up)"; return; fi
  if [ "$MODE" = plumbing ] && { [ "$step" = memcheck ] || [ "$step" = racecheck ]; }; then
    STATUS[$step]="skipped (no GPU: --cpu-plumbing)"; return
  fi
  if { [ "$step" = memcheck ] || [ "$step" = racecheck ]; } && [ "$SANITIZER" = missing ]; then
    STATUS[$step]="skipped (compute-sanitizer not found)"; return
  fi
  printf '\n== %s (limit %s s): %s\n' "$step" "$limit" "${CMD[$step]}" | tee -a "$log"
  local begin=$SECONDS rc
  # Each step its own TorchInductor cache: deploy runs beside the others (and a shared /tmp
  # cache can be cleaned by other users of the machine while a compile writes into it).
  TORCHINDUCTOR_CACHE_DIR="$WORK/inductor/$step" \
    timeout --kill-after=10 "$limit" bash -c "${CMD[$step]}" >>"$log" 2>&1
  rc=$?
  SECS[$step]=$(( SECONDS - begin ))
  if [ $rc -eq 0 ]; then
    STATUS[$step]=passed
    check_step "$step" "$log" || STATUS[$step]="failed ($CHECK_PROBLEM)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    STATUS[$step]="TIMED OUT after $limit s"
  else
    STATUS[$step]="FAILED (exit status $rc)"
  fi
  printf '== %s: %s in %s s\n' "$step" "${STATUS[$step]}" "${SECS[$step]}" | tee -a "$log"
  if [ "$step" = build ] || [ "$step" = deps ]; then
    [ "${STATUS[$step]}" = passed ] || failed_build=1
  fi
}
CHECK_PROBLEM=""
check_step() {  # what an exit status of 0 does not prove
  case "$1" in
    build)
      if [ "$MODE" = gpu ] && ! grep -q "^  cuda  *True" "$2"; then CHECK_PROBLEM="aaren was built without CUDA kernels"; return 1; fi ;;
    test_cuda)
      if [ "$MODE" = gpu ] && ! grep -Eq "[0-9]+ passed" "$2"; then CHECK_PROBLEM="no test ran"; return 1; fi ;;
    bench)
      if grep -q MISMATCH "$2"; then CHECK_PROBLEM="CUDA and CPU kernels disagree (MISMATCH)"; return 1; fi
      if [ "$MODE" = gpu ] && ! grep -q "^## Scan" "$2"; then CHECK_PROBLEM="no benchmark table"; return 1; fi ;;
    deploy)
      if [ "$MODE" = gpu ] && grep -Eq "deploy_cuda_[a-z]+ .*(Skipped|Not Run)" "$2"; then CHECK_PROBLEM="the CUDA deploy cases were skipped"; return 1; fi ;;
  esac
  return 0
}

{
  echo "gpu_check ($MODE mode) on ${HOSTNAME:-?}: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "python3 ${FOUND[PYTHON_VERSION]:-?} ($PY), torch $TORCH, GPU ${FOUND[GPU_NAME]:-none} ${GPU_ARCH:+(compute capability $GPU_ARCH)}"
  echo "nvcc $NVCC, compute-sanitizer $SANITIZER, $JOBS compile jobs, budget $BUDGET s"
  if commit="$(git rev-parse --short HEAD 2>/dev/null)"; then
    echo "git $commit$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)')"
  fi
} > "$OUT_DIR/build.log"
# The GPU benchmark first after the build, on a quiet machine; then the deployment tests (mostly
# CPU work: exporting, compiling the C++ example) in the background while the GPU tests run.
run_step deps
run_step build
run_step bench
(
  run_step deploy
  printf '%s\n%s\n' "${STATUS[deploy]:-not run}" "${SECS[deploy]:-}" > "$WORK/deploy.status"
) &
deploy_pid=$!
for step in test_cuda memcheck racecheck suite; do
  run_step "$step"
done
wait "$deploy_pid"
{ read -r STATUS[deploy]; read -r SECS[deploy]; } < "$WORK/deploy.status"
[ -n "${SECS[deploy]}" ] || unset 'SECS[deploy]'

# ---- summary -------------------------------------------------------------------------
all_passed=1
for step in "${STEPS[@]}"; do
  status="${STATUS[$step]:-not run}"
  if [ "$MODE" = plumbing ] && [ "$status" = "skipped (no GPU: --cpu-plumbing)" ]; then continue; fi
  [ "$status" = passed ] || all_passed=0
done
{
  echo
  echo "gpu_check summary ($MODE mode): python3 ${FOUND[PYTHON_VERSION]:-?}, torch $TORCH, GPU ${FOUND[GPU_NAME]:-none}${GPU_ARCH:+ (sm_${GPU_ARCH/./})}, $(( SECONDS - START )) s of $BUDGET s"
  printf '  %-10s %-44s %7s  %s\n' step result seconds log
  for step in "${STEPS[@]}"; do
    printf '  %-10s %-44s %7s  %s\n' "$step" "${STATUS[$step]:-not run}" "${SECS[$step]:--}" "${LOG[$step]}"
  done
  for log in test_cuda suite; do  # pytest's own last line
    [ ! -f "$OUT_DIR/$log.log" ] || echo "  $log: $(grep -E '[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' "$OUT_DIR/$log.log" | tail -1)"
  done
  [ ! -f "$OUT_DIR/deploy.log" ] || echo "  deploy: $(grep -E 'tests passed' "$OUT_DIR/deploy.log" | tail -1)"
  echo "  logs: $OUT_DIR"
  if [ "$MODE" = plumbing ]; then
    echo "  overall: $([ $all_passed = 1 ] && echo 'every step that needs no GPU passed' || echo 'NOT ALL PASSED') (--cpu-plumbing checks this script, not the GPU)"
  else
    echo "  overall: $([ $all_passed = 1 ] && echo 'PASSED' || echo 'NOT ALL PASSED')"
  fi
} > "$OUT_DIR/summary.txt"
cat "$OUT_DIR/summary.txt"
# The device tool brings back files of at most 16 MiB: keep each log's end.
for file in "$OUT_DIR"/*; do
  if [ -f "$file" ] && [ "$(stat -c %s "$file")" -gt 15000000 ]; then
    tail -c 15000000 "$file" > "$file.tmp" && mv "$file.tmp" "$file"
  fi
done
[ $all_passed = 1 ]
exit
}
