#!/usr/bin/env bash
# Wire compatibility with the real Atropos (atroposlib 0.4.0), both ways. Not part of CI: it
# installs atroposlib from PyPI (once) and starts vLLM on a tiny random model (a few minutes).
#
#   (a) this project's arithmetic environment and trainer through atroposlib's `run-api`
#   (b) atroposlib's BaseEnv registering and posting to this project's API server, and
#       atroposlib's example-trainer batch client (or, where it cannot be imported, the same
#       HTTP calls) fetching the batch
#
# atroposlib ships a top-level `example_trainer` package too, so it lives in a virtual
# environment of its own (ATROPOS_VENV, default ~/.cache/example-trainer/atropos-venv) and
# runs from a directory outside this repository; trainer, vLLM and environment run from .venv.
# Prints one PASS/FAIL line per check; exits 1 if any failed. Logs stay in the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
AVENV=${ATROPOS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/example-trainer/atropos-venv}
WORK=$(mktemp -d /tmp/atropos-compat.XXXXXX)
FAILED=0
log() { printf '[atropos_compat] %s\n' "$*" >&2; }
check() {  # check NAME COMMAND...: one PASS/FAIL line
  if "${@:2}"; then log "PASS $1"; else log "FAIL $1"; FAILED=1; fi
}

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
start() {  # start LOG DIR CMD...: in its own process group, from DIR
  local logfile=$1 dir=$2; shift 2
  (cd "$dir" && exec setsid "$@" >"$logfile" 2>&1) &
  PIDS+=("$!")
}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_up() {  # wait_up URL SECONDS
  "$PY" - "$1" "$2" <<'EOF'
import sys, time, requests
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        requests.get(sys.argv[1], timeout=1)
        sys.exit(0)
    except requests.RequestException:
        time.sleep(0.2)
sys.exit(f"no answer from {sys.argv[1]}")
EOF
}

if [[ ! -x $AVENV/bin/run-api ]]; then
  log "installing atroposlib==0.4.0 into $AVENV"
  python3 -m venv "$AVENV"
  "$AVENV/bin/pip" install -q atroposlib==0.4.0
fi
log "atroposlib $("$AVENV/bin/pip" show atroposlib | sed -n 's/^Version: //p'); work directory $WORK"
MODEL=$("$PY" -c "from example_trainer.tiny_model import build_tiny_model as b; print(b('$WORK/tiny-model'))" 2>/dev/null)

# --- (a) this project's environment and trainer through atroposlib's run-api ---------------
RUNAPI_PORT=$(free_port) VLLM_PORT=$(free_port)
start "$WORK/run-api.log" "$WORK" "$AVENV/bin/run-api" --host 127.0.0.1 --port "$RUNAPI_PORT"
wait_up "http://127.0.0.1:$RUNAPI_PORT/status" 60
start "$WORK/a-environment.log" "$ROOT" "$PY" -m environments.arithmetic \
  --api-url "http://127.0.0.1:$RUNAPI_PORT" --vllm-url "http://127.0.0.1:$VLLM_PORT" \
  --model-name policy --tokenizer "$MODEL" --group-size 4 --max-tokens 12 --partial-credit 0.5
ENV_PID=${PIDS[-1]}
log "(a) trainer (2 steps on the tiny model; vLLM start-up takes a minute or two)"
trainer_rc=0
timeout 900 "$PY" -m example_trainer --model "$MODEL" --api-url "http://127.0.0.1:$RUNAPI_PORT" \
  --vllm-port "$VLLM_PORT" --steps 2 --batch-size 8 --micro-batch-size 4 --lr 1e-3 \
  --max-token-len 128 --dtype float32 --eval-size 0 --save-path "$WORK/a-run" \
  >"$WORK/a-trainer.log" 2>&1 || trainer_rc=$?
for _ in $(seq 120); do kill -0 "$ENV_PID" 2>/dev/null || break; sleep 0.5; done
env_rc=0; if kill -0 "$ENV_PID" 2>/dev/null; then env_rc=running; else wait "$ENV_PID" || env_rc=$?; fi
check "(a) trainer trained 2 steps through run-api (exit $trainer_rc)" \
  grep -q "step 2/2" "$WORK/a-trainer.log"
check "(a) trainer warned once per missing endpoint (/weight_version, /training_finished)" \
  test "$(grep -c 'not sent again' "$WORK/a-trainer.log")" = 2
check "(a) environment stopped by itself within 60 s of the trainer (exit $env_rc)" \
  test "$env_rc" = 0
check "(a) environment warned once that run-api sends no training_finished" \
  test "$(grep -c 'sends no training_finished' "$WORK/a-environment.log")" = 1
check "(a) environment's /status-env calls were accepted (no 422 in run-api's log)" \
  bash -c "grep -q 'GET /status-env' '$WORK/run-api.log' && ! grep -q 'status-env.* 422' '$WORK/run-api.log'"

# --- (b) atroposlib's BaseEnv and batch client against this project's API ------------------
API_PORT=$(free_port)
start "$WORK/b-api.log" "$ROOT" "$PY" -m environments.api_server --host 127.0.0.1 \
  --port "$API_PORT"
wait_up "http://127.0.0.1:$API_PORT/status" 60
cat >"$WORK/b_atropos_side.py" <<'EOF'
"""Runs in atroposlib's venv: its BaseEnv posts a group, its trainer client fetches it."""
import asyncio
import sys

import requests

url, tokenizer = sys.argv[1], sys.argv[2]
try:  # atroposlib's example trainer: the batch client a trainer built on Atropos uses
    from example_trainer.api import get_batch
except Exception as err:  # noqa: BLE001 - report exactly why, then make the same calls
    print(f"atroposlib's example_trainer.api cannot be imported: {type(err).__name__}: {err}")
    get_batch = None
registration = {"wandb_group": "", "wandb_project": "", "batch_size": 2, "max_token_len": 128,
                "starting_step": 0, "checkpoint_dir": "", "save_checkpoint_interval": 0,
                "num_steps": 3}  # the body atroposlib's register_trainer sends
requests.post(f"{url}/register", json=registration, timeout=10).raise_for_status()
first = get_batch(url) if get_batch else requests.get(f"{url}/batch", timeout=10).json()
assert first["batch"] is None, first   # an empty queue; environments may register now

from atroposlib.envs.base import BaseEnv, BaseEnvConfig, ScoredDataGroup  # noqa: E402
from atroposlib.envs.server_handling.server_baseline import ServerBaseline  # noqa: E402


class CompatEnv(BaseEnv):
    name = "compat"

    async def setup(self):
        pass

    async def get_next_item(self):
        return None

    async def evaluate(self, *args, **kwargs):
        pass


async def post_one_group() -> dict:
    config = BaseEnvConfig(tokenizer_name=tokenizer, rollout_server_url=url, group_size=2,
                           use_wandb=False, max_token_length=128, wandb_name="compat",
                           ensure_scores_are_not_same=False)
    env = CompatEnv(config, ServerBaseline(), testing=True)
    await env.register_env()
    await env.get_status()   # GET /status-env with a JSON body
    group = ScoredDataGroup(tokens=[[1, 2, 3, 4], [1, 2, 3, 5]],
                            masks=[[-100, -100, 3, 4], [-100, -100, 3, 5]],
                            scores=[1.0, 0.0])
    await env.handle_send_to_api(group)
    return env.status_dict


status = asyncio.run(post_one_group())
print(f"BaseEnv registered, read /status-env {status}, posted one group")
answer = get_batch(url) if get_batch else requests.get(f"{url}/batch", timeout=10).json()
batch = answer["batch"]
assert batch and batch[0]["tokens"] == [[1, 2, 3, 4], [1, 2, 3, 5]], answer
assert batch[0]["scores"] == [1.0, 0.0], batch
print("batch client fetched the group BaseEnv posted: OK")
EOF
log "(b) atroposlib's BaseEnv and batch client against this project's API"
b_rc=0
(cd "$WORK" && "$AVENV/bin/python" b_atropos_side.py "http://127.0.0.1:$API_PORT" "$MODEL") \
  >"$WORK/b-atropos.log" 2>&1 || b_rc=$?
sed 's/^/    /' "$WORK/b-atropos.log" | tail -n 8 >&2
check "(b) BaseEnv registered, read /status-env, posted; the batch came back (exit $b_rc)" \
  test "$b_rc" = 0

if ((FAILED)); then log "some checks FAILED; logs in $WORK"; exit 1; fi
log "all checks passed; logs in $WORK"
