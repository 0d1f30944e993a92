#!/usr/bin/env bash
# The project's GPU checks in one command, for a lent GPU machine that has the machine's own
# torch/transformers/peft but no network, no vLLM and maybe no pytest:
#
#   bash scripts/gpu_check.sh [BENCH ...]
#
# 1. installs the wheels carried in .gpu-wheels/ (offline, --no-deps, never torch) that
#    this Python lacks, into a throw-away --target directory put on PYTHONPATH (nothing is
#    installed into the machine's Python, so no PEP 668 trouble and nothing to undo);
# 2. prints nvidia-smi and the versions that matter;
# 3. runs `pytest -m gpu` on the test files that use the marker (junit XML and log to $OUT);
# 4. runs the benchmarks named as arguments: offload, logprobs (the default: both), none,
#    or a quoted command line. A benchmark whose module does not exist yet is skipped.
#
# Every step has a timeout and the whole run keeps within GPU_CHECK_BUDGET_S; a failing
# step does not stop the next. Exit status: non-zero when the tests failed (or did not run),
# whatever the benchmarks did. Without CUDA (or with GPU_CHECK_QUICK=1) the benchmarks run
# at tiny sizes, so `bash scripts/gpu_check.sh` checks this script end to end on a CPU box.
#
# Environment: OUT (results; default runs/gpu-check-<time>), PYTHON (default: the first of
# .venv/bin/python, python3, python that imports torch), WHEELS (.gpu-wheels),
# GPU_CHECK_SITE (the --target dir), GPU_CHECK_FORCE (wheels installed even if present;
# default "bitsandbytes", for its CUDA 13 build),
# GPU_CHECK_QUICK, GPU_CHECK_BUDGET_S (480), GPU_CHECK_TEST_TIMEOUT_S (300),
# GPU_CHECK_PER_TEST_S (150), GPU_CHECK_BENCH_TIMEOUT_S (120),
# GPU_CHECK_OFFLOAD_ARGS / GPU_CHECK_OFFLOAD_QUICK_ARGS, GPU_CHECK_LOGPROBS_ARGS /
# GPU_CHECK_LOGPROBS_QUICK_ARGS (override the benchmark flags).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT=${OUT:-$ROOT/runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if [[ -z ${PYTHON:-} ]]; then  # the first that has torch: the machine's torch is under test
  for PYTHON in "$ROOT/.venv/bin/python" python3 python; do
    "$PYTHON" -c "import torch" 2>/dev/null && break
  done
fi
WHEELS=${WHEELS:-$ROOT/.gpu-wheels}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/example-trainer-gpu-site}
FORCE=${GPU_CHECK_FORCE:-bitsandbytes}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-300}
PER_TEST=${GPU_CHECK_PER_TEST_S:-150}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT_S:-120}
# Benchmark flags: on the GPU, and tiny ones for quick mode.
OFFLOAD_FULL="--params 1b --tokens 8192"
OFFLOAD_QUICK="--params tiny --tokens 256"
LOGPROBS_FULL="--device cuda --dtype bfloat16 --vocab 49152 --hidden 576 --layers 4 --heads 9"
LOGPROBS_FULL+=" --batch 8 --seq 1024 --repeats 5"
LOGPROBS_QUICK="--vocab 2048 --hidden 64 --layers 1 --batch 2 --seq 64 --repeats 1"
START=$SECONDS
SUMMARY=()

log() { printf '[gpu_check %4ss] %s\n' "$((SECONDS - START))" "$*"; }
record() { SUMMARY+=("$(printf '%-15s %-10s %5ss  %s' "$1" "$2" "$3" "${4:-}")"); }

# step NAME LIMIT_S LOGFILE CMD...: run CMD under a timeout trimmed to the budget left,
# tee its output to LOGFILE, record the outcome; returns CMD's status (124: timed out).
step() {
  local name=$1 limit=$2 logfile=$3 left rc t0
  shift 3
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then
    log "skip $name: the ${BUDGET}s budget is spent"; record "$name" skipped 0 "budget spent"
    return 125
  fi
  ((limit > left)) && limit=$left
  log "== $name (timeout ${limit}s): $*"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$logfile"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) record "$name" ok "$((SECONDS - t0))" ;;
    124|137) record "$name" "timed out" "$((SECONDS - t0))" "after ${limit}s; log $logfile" ;;
    *) record "$name" "failed" "$((SECONDS - t0))" "exit $rc; log $logfile" ;;
  esac
  return "$rc"
}

# --- 1. carried wheels --------------------------------------------------------------------
install_wheels() {
  rm -rf "$SITE" && mkdir -p "$SITE"
  local picked
  picked=$("$PYTHON" - "$WHEELS" "$FORCE" <<'EOF'
"""Print the carried wheels this Python lacks (pytest's own dependencies come with it)."""
import importlib.metadata as md
import pathlib
import re
import sys

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

def present(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False

wheels = {norm(w.name.split("-")[0]): w for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))}
forced = {norm(n) for n in sys.argv[2].replace(",", " ").split()}
pick = {n for n in wheels if n in forced or not present(n)}
if "pytest" in pick:  # a newer pytest needs its own pluggy/iniconfig/pygments/packaging
    pick |= {"pluggy", "iniconfig", "pygments", "packaging"} & wheels.keys()
pick -= {"torch"}  # the machine's torch is the one under test, never replaced
print("\n".join(str(wheels[n]) for n in sorted(pick)))
EOF
  ) || return 1
  if [[ -z $picked ]]; then log "nothing to install from $WHEELS"; return 0; fi
  mapfile -t files <<<"$picked"
  log "installing into $SITE: ${files[*]##*/}"
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    timeout -k 10 120 "$PYTHON" -m pip install -q --disable-pip-version-check --no-index \
      --no-deps --no-warn-conflicts --find-links "$WHEELS" --target "$SITE" "${files[@]}" \
      && return 0
    log "pip failed; unpacking the wheels instead"
  fi
  local wheel
  for wheel in "${files[@]}"; do "$PYTHON" -m zipfile -e "$wheel" "$SITE" || return 1; done
}

if [[ -d $WHEELS ]]; then
  t0=$SECONDS
  if install_wheels >"$OUT/wheels.log" 2>&1; then record wheels ok "$((SECONDS - t0))"
  else record wheels failed "$((SECONDS - t0))" "log $OUT/wheels.log"; fi
  cat "$OUT/wheels.log"
else
  log "no $WHEELS directory: using this Python's packages as they are"
  record wheels skipped 0 "no $WHEELS"
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

# --- 2. the machine -----------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
  step nvidia-smi 30 "$OUT/nvidia-smi.txt" nvidia-smi
else
  log "no nvidia-smi"; record nvidia-smi skipped 0 "not installed"
fi
step versions 90 "$OUT/versions.txt" "$PYTHON" - <<'EOF'
import importlib.metadata as md
import sys

import torch

print(f"python {sys.version.split()[0]} ({sys.executable})")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: "
      f"{torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability "
          f"{p.major}.{p.minor}")
if torch.cuda.is_available():
    print(f"nccl {'.'.join(map(str, torch.cuda.nccl.version()))}")
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "torchao", "pytest",
             "pytest-timeout", "requests", "tokenizers", "safetensors", "vllm"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} -")
try:
    import bitsandbytes
    print(f"bitsandbytes imports from {bitsandbytes.__file__}")
except Exception as exc:  # report, don't stop: the bnb tests will say more
    print(f"bitsandbytes import failed: {type(exc).__name__}: {exc}")
EOF

if [[ -z ${GPU_CHECK_QUICK:-} ]]; then
  if "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null
  then GPU_CHECK_QUICK=0; else GPU_CHECK_QUICK=1; fi
fi
((GPU_CHECK_QUICK)) && log "quick mode: no CUDA (or GPU_CHECK_QUICK=1): tiny benchmarks"

# --- 3. the tests -------------------------------------------------------------------------
mapfile -t TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py 2>/dev/null)
# A file that fails to import (a missing package) is reported, and the others still run.
PYTEST_ARGS=(-m gpu -q -p no:cacheprovider -raP --continue-on-collection-errors
             --junitxml="$OUT/pytest-junit.xml")
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
  PYTEST_ARGS+=(--timeout="$PER_TEST")
fi
if ((${#TEST_FILES[@]})); then
  step tests "$TEST_TIMEOUT" "$OUT/pytest.log" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" \
    "${TEST_FILES[@]}"
  TESTS_RC=$?
else
  log "no test file uses the gpu marker"; record tests failed 0 "no gpu tests found"
  TESTS_RC=5
fi
grep -h "gpu-figure:" "$OUT/pytest.log" 2>/dev/null | sed 's/^.*gpu-figure: //' \
  >"$OUT/figures.txt" || true

# --- 4. the benchmarks --------------------------------------------------------------------
has_module() { "$PYTHON" -c "import importlib.util as u, sys; \
sys.exit(u.find_spec('$1') is None)" 2>/dev/null; }

bench() {
  local args
  case $1 in
    offload)
      if ! has_module example_trainer.bench.offload; then
        log "skip offload: example_trainer.bench.offload does not exist (yet)"
        record bench:offload skipped 0 "no module"; return
      fi
      if ((GPU_CHECK_QUICK)); then args=${GPU_CHECK_OFFLOAD_QUICK_ARGS:-$OFFLOAD_QUICK}
      else args=${GPU_CHECK_OFFLOAD_ARGS:-$OFFLOAD_FULL}; fi
      # shellcheck disable=SC2086  # the flags are meant to split
      step bench:offload "$BENCH_TIMEOUT" "$OUT/bench-offload.log" "$PYTHON" -m \
        example_trainer.bench.offload $args --out "$OUT/offload.json" ;;
    logprobs)
      if ((GPU_CHECK_QUICK)); then
        args=${GPU_CHECK_LOGPROBS_QUICK_ARGS:-$LOGPROBS_QUICK}
      else
        args=${GPU_CHECK_LOGPROBS_ARGS:-$LOGPROBS_FULL}
      fi
      # shellcheck disable=SC2086
      step bench:logprobs "$BENCH_TIMEOUT" "$OUT/bench-logprobs.log" "$PYTHON" \
        scripts/bench_logprobs.py $args ;;
    none) ;;
    *' '*)
      step "bench:custom" "$BENCH_TIMEOUT" "$OUT/bench-custom-$((++CUSTOM)).log" bash -c "$1" ;;
    *)
      log "unknown benchmark $1 (offload, logprobs, none, or a quoted command)"
      record "bench:$1" unknown 0 ;;
  esac
}
CUSTOM=0
(($#)) || set -- offload logprobs
for name in "$@"; do bench "$name"; done

# --- summary ------------------------------------------------------------------------------
{
  echo "gpu_check summary ($((SECONDS - START)) s, quick=$GPU_CHECK_QUICK, results in $OUT)"
  printf '  %s\n' "${SUMMARY[@]}"
  if [[ -s $OUT/figures.txt ]]; then echo "figures:"; sed 's/^/  /' "$OUT/figures.txt"; fi
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped)" "$OUT/pytest.log" 2>/dev/null \
    | sed 's/^/  pytest: /' | tail -20
} | tee "$OUT/summary.txt"
if ((TESTS_RC != 0)); then
  log "the GPU tests failed or did not run (pytest exit $TESTS_RC)"
  exit 1
fi
