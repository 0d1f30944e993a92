"""Trajectory API: a drop-in replacement for Atropos' `run-api` (atroposlib 0.4.0 protocol).

Environments post scored groups of rollouts; the trainer polls /batch for exactly
`batch_size` sequences. The endpoints and JSON shapes are Atropos', so Atropos environments
and trainers work against it unchanged, but it fixes the reference server's measured faults:

- every post is validated (lengths, mask values, finite numbers, token limits) and a bad one
  is answered 422 naming the field and index, with nothing already queued lost or changed;
- batches are served oldest first and hold exactly `batch_size` sequences; groups whose sizes
  cannot pack exactly are split (with the whole group's score mean/std attached), so no group
  waits forever;
- the queue is bounded (`--max-queue-sequences`) and a full queue answers 429 + Retry-After;
- /reset_data really resets (a later /register takes effect, /batch answers null, not 500);
- the end of training is an explicit signal (POST /training_finished), not a sample count;
- the trainer publishes the weight version vLLM serves (POST /weight_version, shown in
  /status), which environments copy into each group they post as `weight_version`;
- request bodies are capped (`--max-request-mb`, 413 before anything is parsed), gzip bodies
  (`Content-Encoding: gzip`) are accepted and capped after decompression, other encodings
  get 415 and a broken gzip stream 400.

Run: python -m environments.api_server --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import statistics
import uuid
import zlib
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

log = logging.getLogger("environments.api_server")

# Fields that hold one entry per sequence; a split slices all of them the same way.
PER_SEQUENCE_FIELDS = ("tokens", "masks", "scores", "advantages", "ref_logprobs",
                       "inference_logprobs", "messages", "overrides")
# Per-token float fields that, when present, must line up with `tokens`.
PER_TOKEN_FLOAT_FIELDS = ("advantages", "ref_logprobs", "inference_logprobs")
# After the oldest group has been passed over by this many exact-fit batches, the next batch
# is filled oldest-first (splitting if needed), so an awkwardly sized group cannot starve.
MAX_PASSED_OVER = 2
MASK_IGNORE = -100
# Token ids above int32 belong to no vocabulary, and past int64 the trainer's tensors overflow.
MAX_TOKEN_ID = 2**31 - 1
DEFAULT_MAX_REQUEST_MB = 64


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------

class TrainerRegistration(BaseModel):
    """POST /register: the trainer's batch shape and run metadata."""

    model_config = ConfigDict(extra="allow")
    batch_size: int = Field(gt=0)
    max_token_len: int = Field(gt=0)
    wandb_group: str | None = None
    wandb_project: str | None = None
    checkpoint_dir: str = ""
    save_checkpoint_interval: int = 0
    starting_step: int = Field(default=0, ge=0)
    num_steps: int = 0


class EnvRegistration(BaseModel):
    """POST /register-env: one environment worker announcing itself."""

    model_config = ConfigDict(extra="allow")
    max_token_length: int
    desired_name: str
    weight: float = Field(default=1.0, ge=0)
    group_size: int = Field(gt=0)
    min_batch_allocation: float | None = None


class WeightVersion(BaseModel):
    """POST /weight_version: the trainer announces which weights vLLM now serves."""

    version: StrictInt = Field(ge=0)


class EnvRef(BaseModel):
    """POST /disconnect-env body."""

    env_id: StrictInt


class ScoredData(BaseModel):
    """One scored group as environments post it; unknown fields are kept and passed on."""

    model_config = ConfigDict(extra="allow")
    tokens: list[list[StrictInt]]
    masks: list[list[StrictInt]]
    scores: list[StrictFloat]
    advantages: list[list[StrictFloat]] | None = None
    ref_logprobs: list[list[StrictFloat]] | None = None
    inference_logprobs: list[list[StrictFloat]] | None = None
    messages: list[Any] | None = None
    generation_params: dict[str, Any] | None = None
    overrides: list[dict[str, Any]] | None = None
    group_overrides: dict[str, Any] | None = None
    env_id: StrictInt | None = None


# ---------------------------------------------------------------------------------------------
# Errors the state raises; create_app maps each to one HTTP status
# ---------------------------------------------------------------------------------------------

class GroupError(ValueError):
    """A post that must not enter the queue (422); the message names field and index."""


class QueueFull(RuntimeError):
    """Accepting the post would exceed max_queue_sequences (429, retry later)."""


class TrainingFinished(RuntimeError):
    """Training has ended; more data has nowhere to go (409)."""


class UnknownEnv(LookupError):
    """An env_id that was never registered or has disconnected (404)."""


# ---------------------------------------------------------------------------------------------
# Validation, packing and splitting (pure functions, no HTTP)
# ---------------------------------------------------------------------------------------------

def _first_bad_float(row: list[float]) -> int | None:
    if all(map(math.isfinite, row)):
        return None
    return next(i for i, value in enumerate(row) if not math.isfinite(value))


def _non_finite_path(value: Any, path: str) -> str | None:
    """Where a NaN/inf hides in free-form JSON; it would make /batch fail to serialise."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for sub_path, item in items:
        found = _non_finite_path(item, sub_path)
        if found:
            return found
    return None


def check_group(group: ScoredData, *, batch_size: int | None, max_token_len: int | None,
                env_ids: Collection[int]) -> None:
    """Raise GroupError for the first inconsistency; the trainer must never see a bad group."""
    n = len(group.tokens)
    if n == 0:
        raise GroupError("tokens is empty: a group needs at least one sequence")
    for name in ("masks", "scores"):
        if len(getattr(group, name)) != n:
            raise GroupError(f"{name} has {len(getattr(group, name))} entries but tokens has {n}")
    if batch_size is not None and n > batch_size:
        raise GroupError(f"tokens holds a group of {n} sequences, more than the trainer's "
                         f"batch_size {batch_size}: it can never fit in a batch")
    for i, (tokens, mask) in enumerate(zip(group.tokens, group.masks)):
        if not tokens:
            raise GroupError(f"tokens[{i}] is empty")
        if max_token_len is not None and len(tokens) > max_token_len:
            raise GroupError(f"tokens[{i}] has {len(tokens)} tokens, more than the trainer's "
                             f"max_token_len {max_token_len}")
        if len(mask) != len(tokens):
            raise GroupError(f"masks[{i}] has {len(mask)} entries but tokens[{i}] has "
                             f"{len(tokens)}")
        if min(tokens) < 0:
            t = next(t for t, tok in enumerate(tokens) if tok < 0)
            raise GroupError(f"tokens[{i}][{t}] is a negative token id ({tokens[t]})")
        if max(tokens) > MAX_TOKEN_ID:
            t = next(t for t, tok in enumerate(tokens) if tok > MAX_TOKEN_ID)
            raise GroupError(f"tokens[{i}][{t}] is {tokens[t]}, not a token id (ids are "
                             f"below 2**31; the trainer checks its own vocabulary size)")
        bad = next((t for t, (tok, m) in enumerate(zip(tokens, mask))
                    if m != MASK_IGNORE and m != tok), None)
        if bad is not None:
            raise GroupError(f"masks[{i}][{bad}] is {mask[bad]}; it must be {MASK_IGNORE} "
                             f"(prompt) or the token id {tokens[bad]} (trained)")
        if mask.count(MASK_IGNORE) == len(mask):
            raise GroupError(f"masks[{i}] has no trained token (every entry is {MASK_IGNORE}): "
                             f"sequence {i} has nothing to learn from")
    bad = _first_bad_float(group.scores)
    if bad is not None:
        raise GroupError(f"scores[{bad}] is not finite ({group.scores[bad]})")
    for name in PER_TOKEN_FLOAT_FIELDS:
        rows = getattr(group, name)
        if rows is None:
            continue
        if len(rows) != n:
            raise GroupError(f"{name} has {len(rows)} entries but tokens has {n}")
        for i, (row, tokens) in enumerate(zip(rows, group.tokens)):
            if len(row) != len(tokens):
                raise GroupError(f"{name}[{i}] has {len(row)} entries but tokens[{i}] has "
                                 f"{len(tokens)}")
            bad = _first_bad_float(row)
            if bad is not None:
                raise GroupError(f"{name}[{i}][{bad}] is not finite ({row[bad]})")
    if group.overrides is not None and len(group.overrides) != n:
        raise GroupError(f"overrides has {len(group.overrides)} entries but tokens has {n}")
    if group.env_id is not None and group.env_id not in env_ids:
        raise GroupError(f"env_id {group.env_id} is not a registered environment "
                         f"(registered: {sorted(env_ids)}); call /register-env first")
    free_form = {"messages": group.messages, "generation_params": group.generation_params,
                 "overrides": group.overrides, "group_overrides": group.group_overrides,
                 **(group.model_extra or {})}
    for name, value in free_form.items():
        path = _non_finite_path(value, name)
        if path:
            raise GroupError(f"{path} is not finite: JSON cannot carry NaN or inf")


def exact_subset(sizes: list[int], target: int) -> list[int] | None:
    """Indices of the lexicographically earliest subset of `sizes` summing to `target`.

    reach[i] is a bitset of the sums reachable with sizes[i:]; walking forward we take a group
    whenever what is left can still be made from the groups after it, which prefers the oldest.
    """
    limit = (1 << (target + 1)) - 1
    reach = [0] * (len(sizes) + 1)
    reach[-1] = 1
    for i in range(len(sizes) - 1, -1, -1):
        reach[i] = (reach[i + 1] | (reach[i + 1] << sizes[i])) & limit
    if not (reach[0] >> target) & 1:
        return None
    chosen, remaining = [], target
    for i, size in enumerate(sizes):
        if remaining == 0:
            break
        if size <= remaining and (reach[i + 1] >> (remaining - size)) & 1:
            chosen.append(i)
            remaining -= size
    return chosen


def split_group(group: dict[str, Any], k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cut a group after its first k sequences, keeping the whole group's score statistics.

    Both parts get group_overrides {group_score_mean, group_score_std (population),
    split_of: original size} so the trainer normalises advantages over the whole group. A part
    that is split again keeps the statistics of the original group.
    """
    n = len(group["tokens"])
    stats = dict(group.get("group_overrides") or {})
    if "split_of" not in stats:
        stats.update(group_score_mean=statistics.fmean(group["scores"]),
                     group_score_std=statistics.pstdev(group["scores"]), split_of=n)
    head, tail = dict(group), dict(group)
    for name in PER_SEQUENCE_FIELDS:
        value = group.get(name)
        if isinstance(value, list) and len(value) == n:
            head[name], tail[name] = value[:k], value[k:]
    head["group_overrides"], tail["group_overrides"] = stats, dict(stats)
    return head, tail


# ---------------------------------------------------------------------------------------------
# Server state
# ---------------------------------------------------------------------------------------------

@dataclass
class _Queued:
    group: dict[str, Any]
    size: int
    passed_over: int = 0


class TrajectoryState:
    """Everything the API remembers. Methods never await, so on one event loop each is atomic."""

    def __init__(self, max_queue_sequences: int) -> None:
        self.max_queue_sequences = max_queue_sequences
        self.reset()

    def reset(self) -> None:
        # New per start and per reset: a trainer that sees it change knows its registration
        # was forgotten and registers again (example_trainer.api.BatchFetcher).
        self.instance_id = uuid.uuid4().hex
        self.trainer: TrainerRegistration | None = None
        self.trainer_uuid: str | None = None
        self.started = False
        self.finished = False
        self.finish_reason: str | None = None
        self.current_step = 0
        self.queue: deque[_Queued] = deque()
        self.queued_sequences = 0
        self.envs: dict[int, EnvRegistration] = {}
        self.next_env_id = 0
        self.latest_example: dict[str, Any] | None = None
        self.weight_version: int | None = None

    # --- trainer and environments -------------------------------------------------------------

    def register_trainer(self, reg: TrainerRegistration) -> str:
        if self.trainer is not None:
            log.info("trainer re-registered: batch_size %d -> %d, max_token_len %d -> %d, "
                     "step %d -> %d", self.trainer.batch_size, reg.batch_size,
                     self.trainer.max_token_len, reg.max_token_len, self.current_step,
                     reg.starting_step)
        if self.finished:
            log.info("new trainer registration clears the training-finished state")
            self.finished, self.finish_reason = False, None
        self.trainer, self.trainer_uuid = reg, str(uuid.uuid4())
        self.current_step = reg.starting_step
        log.info("trainer registered: batch_size=%d max_token_len=%d starting_step=%d "
                 "num_steps=%d", reg.batch_size, reg.max_token_len, reg.starting_step,
                 reg.num_steps)
        return self.trainer_uuid

    def register_env(self, reg: EnvRegistration) -> dict[str, Any]:
        if self.finished:
            return {"status": "finished"}
        if not self.started or self.trainer is None:
            return {"status": "wait for trainer to start"}
        env_id, self.next_env_id = self.next_env_id, self.next_env_id + 1
        self.envs[env_id] = reg
        name = f"{reg.desired_name}_{env_id}"
        log.info("environment %s registered: env_id=%d group_size=%d weight=%g", name, env_id,
                 reg.group_size, reg.weight)
        if reg.group_size > self.trainer.batch_size:
            log.warning("environment %s posts groups of %d, more than batch_size %d: its "
                        "groups will be rejected", name, reg.group_size, self.trainer.batch_size)
        return {"status": "success", "env_id": env_id, "wandb_name": name,
                "checkpoint_dir": self.trainer.checkpoint_dir,
                "starting_step": self.current_step,
                "checkpoint_interval": self.trainer.save_checkpoint_interval,
                "num_steps": self.trainer.num_steps}

    def env(self, env_id: int) -> EnvRegistration:
        if env_id not in self.envs:
            raise UnknownEnv(f"env_id {env_id} is not registered "
                             f"(registered: {sorted(self.envs)})")
        return self.envs[env_id]

    def disconnect_env(self, env_id: int) -> None:
        reg = self.env(env_id)
        del self.envs[env_id]
        log.info("environment %s_%d disconnected", reg.desired_name, env_id)

    def finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason
        log.info("training finished (%s) at step %d; %d sequences left in the queue", reason,
                 self.current_step, self.queued_sequences)

    # --- data in --------------------------------------------------------------------------------

    def add_groups(self, groups: list[ScoredData], *, as_list: bool) -> None:
        """Queue all groups or none: validate everything before touching the queue."""
        if self.finished:
            raise TrainingFinished(f"training has finished ({self.finish_reason}); scored data "
                                   "is no longer accepted")
        limits = dict(batch_size=self.trainer.batch_size if self.trainer else None,
                      max_token_len=self.trainer.max_token_len if self.trainer else None,
                      env_ids=self.envs.keys())
        for k, group in enumerate(groups):
            try:
                check_group(group, **limits)
            except GroupError as err:
                raise GroupError(f"groups[{k}]: {err}" if as_list else str(err)) from None
        incoming = sum(len(group.tokens) for group in groups)
        if incoming > self.max_queue_sequences:
            raise GroupError(f"this post holds {incoming} sequences, more than the whole queue "
                             f"(max_queue_sequences {self.max_queue_sequences}): post fewer "
                             "at once")
        if self.queued_sequences + incoming > self.max_queue_sequences:
            raise QueueFull(f"queue holds {self.queued_sequences} of {self.max_queue_sequences} "
                            f"sequences; {incoming} more would exceed the limit: retry later")
        for group in groups:
            data = group.model_dump()
            self.queue.append(_Queued(data, len(group.tokens)))
            self.latest_example = data
        self.queued_sequences += incoming
        log.debug("queued %d groups (%d sequences); queue now %d", len(groups), incoming,
                  self.queued_sequences)

    # --- data out -------------------------------------------------------------------------------

    def next_batch(self) -> list[dict[str, Any]] | None:
        """Exactly batch_size sequences, oldest first, or None if the queue holds too few."""
        if self.trainer is None or self.finished:
            return None
        if not self.started:
            log.info("trainer started polling for batches; environments may register now")
            self.started = True
        target = self.trainer.batch_size
        if self.queued_sequences < target:
            return None
        chosen = exact_subset([entry.size for entry in self.queue], target)
        starving = self.queue[0].passed_over >= MAX_PASSED_OVER
        if chosen is not None and not (starving and chosen[0] != 0):
            batch, split = self._take(chosen), False
        else:
            batch, split = self._fill_and_split(target), True
        self.queued_sequences -= target
        self.current_step += 1
        log.info("served batch for step %d: %d groups, %d sequences%s; %d sequences queued",
                 self.current_step, len(batch), target, " (split a group)" if split else "",
                 self.queued_sequences)
        return batch

    def _take(self, chosen: list[int]) -> list[dict[str, Any]]:
        picked, last = set(chosen), chosen[-1]
        batch, keep = [], deque()
        for i, entry in enumerate(self.queue):
            if i in picked:
                batch.append(entry.group)
                continue
            if i < last:
                entry.passed_over += 1
            keep.append(entry)
        self.queue = keep
        return batch

    def _fill_and_split(self, target: int) -> list[dict[str, Any]]:
        """Oldest groups whole while they fit, then the first part of the next one."""
        batch, remaining = [], target
        while remaining:
            entry = self.queue[0]
            if entry.size <= remaining:
                self.queue.popleft()
                batch.append(entry.group)
                remaining -= entry.size
            else:
                head, entry.group = split_group(entry.group, remaining)
                entry.size -= remaining
                batch.append(head)
                remaining = 0
        return batch

    # --- status ---------------------------------------------------------------------------------

    def env_sequences(self, env_id: int) -> int:
        return sum(entry.size for entry in self.queue if entry.group.get("env_id") == env_id)

    def status(self) -> dict[str, Any]:
        return {"current_step": self.current_step, "queue_size": self.queued_sequences,
                "training_finished": self.finished, "weight_version": self.weight_version,
                "max_queue_sequences": self.max_queue_sequences,
                "instance_id": self.instance_id}

    def env_status(self, env_id: int) -> dict[str, Any]:
        reg = self.env(env_id)
        own = self.env_sequences(env_id)
        allocated = sum(e.min_batch_allocation or 0.0 for e in self.envs.values())
        return {**self.status(), "env_queue_size": own, "env_weight": reg.weight,
                # Atropos BaseEnv reads these three; units are its (groups of this env).
                "self_queue_size": own // reg.group_size,
                "max_group_size": max(e.group_size for e in self.envs.values()),
                "unallocated_fraction": max(0.0, 1.0 - allocated)}


# ---------------------------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------------------------

def _loc(parts: tuple[Any, ...]) -> str:
    """('body', 0, 'tokens', 1, 2) -> 'groups[0].tokens[1][2]'."""
    parts = parts[1:] if parts and parts[0] == "body" else parts
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]" if text else f"groups[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


def _readable_validation_error(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            messages.append(f"request body is not valid JSON "
                            f"({error.get('ctx', {}).get('error', 'decode error')})")
            continue
        text = f"{_loc(tuple(error.get('loc', ())))}: {error.get('msg', 'invalid')}"
        shown = repr(error.get("input"))
        if "input" in error and len(shown) <= 40 and error.get("type") != "missing":
            text += f" (got {shown})"
        messages.append(text)
    return "; ".join(messages[:5]) + (f"; and {len(messages) - 5} more" if len(messages) > 5
                                      else "")


async def _optional_json(request: Request) -> dict[str, Any]:
    """Body of endpoints where Atropos sends JSON on a GET, or where a body is optional."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as err:
        raise GroupError(f"request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise GroupError("request body must be a JSON object")
    return body


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class RequestBodyLimit:
    """ASGI middleware: bound every request body and decode gzip ones, before any parsing.

    Without it one huge (or highly compressed) post could exhaust the server's memory and lose
    everything queued. Over the limit: 413; a Content-Encoding other than gzip/identity: 415;
    a gzip stream that does not decode: 400. Each answer names the limit or the problem.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, what: str) -> JSONResponse:
        return _error(413, f"{what} exceeds the server's limit of {self.max_bytes} bytes: "
                           "post fewer groups at once (or start the server with a larger "
                           "--max-request-mb)")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.lower(): value for key, value in scope["headers"]}
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip()
        if encoding.lower() not in ("", "identity", "gzip"):
            await _error(415, f"Content-Encoding {encoding!r} is not supported: send plain "
                              "JSON or gzip")(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        body, too_large = bytearray(), declared.isdigit() and int(declared) > self.max_bytes
        more = True
        while more:  # read (and, once over the limit, discard) so the client gets its answer
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            more = message.get("more_body", False)
            if not too_large:
                body += message.get("body", b"")
                too_large = len(body) > self.max_bytes
        if too_large:
            await self._too_large("request body")(scope, receive, send)
            return
        if encoding.lower() == "gzip":
            decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                body = bytearray(decoder.decompress(bytes(body), self.max_bytes + 1))
            except zlib.error as err:
                await _error(400, f"request body is not valid gzip ({err}) although "
                                  "Content-Encoding says gzip")(scope, receive, send)
                return
            if len(body) > self.max_bytes or decoder.unconsumed_tail:
                await self._too_large("decompressed request body")(scope, receive, send)
                return
            if not decoder.eof:
                await _error(400, "request body is a truncated gzip stream")(scope, receive,
                                                                              send)
                return
        scope = dict(scope, headers=[(key, value) for key, value in scope["headers"]
                                     if key.lower() not in (b"content-encoding",
                                                            b"content-length")]
                     + [(b"content-length", str(len(body)).encode())])
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def create_app(max_queue_sequences: int = 4096,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20) -> FastAPI:
    """Build the API around a fresh TrajectoryState (tests and main() both use this)."""
    state = TrajectoryState(max_queue_sequences)
    app = FastAPI(title="example-trainer trajectory API (Atropos run-api protocol)")
    app.state.trajectories = state
    app.add_middleware(RequestBodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _on_invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _readable_validation_error(exc))

    @app.exception_handler(GroupError)
    async def _on_bad_group(_: Request, exc: GroupError) -> JSONResponse:
        log.debug("rejected post: %s", exc)
        return _error(422, str(exc))

    @app.exception_handler(QueueFull)
    async def _on_full(_: Request, exc: QueueFull) -> JSONResponse:
        return _error(429, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(TrainingFinished)
    async def _on_finished(_: Request, exc: TrainingFinished) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(UnknownEnv)
    async def _on_unknown_env(_: Request, exc: UnknownEnv) -> JSONResponse:
        return _error(404, str(exc))

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"message": "trajectory API (Atropos run-api protocol)"}

    @app.post("/register")
    async def register(reg: TrainerRegistration) -> dict[str, str]:
        return {"uuid": state.register_trainer(reg)}

    @app.post("/register-env")
    async def register_env(reg: EnvRegistration) -> dict[str, Any]:
        return state.register_env(reg)

    @app.post("/disconnect-env")
    async def disconnect_env(ref: EnvRef) -> dict[str, str]:
        state.disconnect_env(ref.env_id)
        return {"status": "success"}

    @app.get("/wandb_info")
    async def wandb_info() -> dict[str, Any]:
        trainer = state.trainer
        return {"group": trainer.wandb_group if trainer else None,
                "project": trainer.wandb_project if trainer else None}

    @app.get("/info")
    async def info() -> dict[str, int]:
        trainer = state.trainer
        return {"batch_size": trainer.batch_size if trainer else -1,
                "max_token_len": trainer.max_token_len if trainer else -1}

    @app.get("/batch")
    async def batch() -> JSONResponse:
        # JSONResponse directly: skips jsonable_encoder's slow walk over big token lists.
        return JSONResponse({"batch": state.next_batch()})

    @app.post("/scored_data")
    async def scored_data(group: ScoredData) -> dict[str, str]:
        state.add_groups([group], as_list=False)
        return {"status": "received"}

    @app.post("/scored_data_list")
    async def scored_data_list(groups: list[ScoredData]) -> dict[str, Any]:
        state.add_groups(groups, as_list=True)
        return {"status": "received", "groups": len(groups)}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return state.status()

    @app.post("/weight_version")
    async def weight_version(body: WeightVersion) -> dict[str, Any]:
        """Environments read it from /status and tag each group with the version it was
        sampled under, so the trainer can measure (and bound) off-policy staleness."""
        state.weight_version = body.version
        log.info("trainer serves weight version %d", body.version)
        return {"status": "ok", "weight_version": body.version}

    @app.get("/status-env")
    async def status_env(request: Request, env_id: int | None = None) -> dict[str, Any]:
        if env_id is None:
            env_id = (await _optional_json(request)).get("env_id")
        if not isinstance(env_id, int) or isinstance(env_id, bool):
            raise GroupError("env_id is required as an integer: ?env_id=N or a JSON body "
                             '{"env_id": N}')
        return state.env_status(env_id)

    @app.get("/latest_example")
    async def latest_example() -> JSONResponse:
        return JSONResponse(state.latest_example or {})

    @app.get("/reset_data")
    async def reset_data() -> dict[str, str]:
        state.reset()
        log.info("state reset: queue, environments, trainer registration and step cleared")
        return {"status": "reset"}

    @app.post("/training_finished")
    async def training_finished(request: Request) -> dict[str, Any]:
        reason = (await _optional_json(request)).get("reason") or "unspecified"
        state.finish(str(reason))
        return {"status": "finished", "reason": str(reason)}

    return app


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m environments.api_server",
        description="Trajectory API (drop-in for Atropos run-api): environments post scored "
                    "groups, the trainer polls /batch.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-queue-sequences", type=_positive_int, default=4096,
                        help="queue bound in sequences; posts beyond it get 429 + Retry-After")
    parser.add_argument("--max-request-mb", type=_positive_int,
                        default=DEFAULT_MAX_REQUEST_MB,
                        help="largest request body in MiB (after gzip decoding); larger "
                             "posts get 413")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="debug also logs every post and every HTTP request")
    return parser


def _bind(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so a busy port is one clear error rather than a trace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, configure logging, serve until SIGINT/SIGTERM; 2 if the port is busy."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = _bind(args.host, args.port)
    except OSError as err:
        log.error("cannot listen on %s:%d: %s (is another server running there? choose "
                  "another --port)", args.host, args.port, err.strerror or err)
        return 2
    log.info("trajectory API listening on http://%s:%d (max_queue_sequences=%d)", args.host,
             sock.getsockname()[1], args.max_queue_sequences)
    config = uvicorn.Config(create_app(args.max_queue_sequences, args.max_request_mb << 20),
                            log_config=None,
                            log_level=args.log_level, access_log=args.log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
