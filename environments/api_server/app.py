"""The trajectory API's HTTP layer: FastAPI routes over a `TrajectoryQueue`.

Routes and JSON shapes are Atropos' run-api (atroposlib 0.4.0). This module only translates:
request bodies are parsed by the models in `schema`, the queue's exceptions become status codes
(GroupError 422, QueueFull 429 + Retry-After, TrainingFinished 409, UnknownEnv 404), a post's
optional `Idempotency-Key` header makes its retries safe (stored once, `queue.post_groups`),
`RequestBodyLimit` bounds every body (413) before anything is parsed, and with a shared secret
`BearerAuth` answers 401 to every request that does not carry it, before anything else runs.
"""

from __future__ import annotations

import json
import logging
import zlib
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..transport import API_TOKEN_ENV, IDEMPOTENCY_KEY_HEADER, bearer_matches
from .queue import (DEFAULT_LEASE_TIMEOUT_S, MEMORY, QueueFull, TrainingFinished,
                    TrajectoryQueue, UnknownEnv)
from .schema import (EnvRef, EnvRegistration, GroupError, LeaseAck, ScoredData,
                     TrainerRegistration, WeightVersion)

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_MB = 64

# The optional Idempotency-Key header of a post: a repeat of a stored key with the same groups
# stores nothing and answers "received" with "duplicate": true (the client's retry after a lost
# answer); the key with other groups is refused (422).
PostKey = Annotated[str | None, Header(alias=IDEMPOTENCY_KEY_HEADER, min_length=1,
                                       max_length=200)]


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


class BearerAuth:
    """ASGI middleware: every request must carry `Authorization: Bearer <token>`, else 401.

    Every path is guarded, /status and / included: /status tells the weight version and the
    queue, and a server that answers anything unauthenticated can be told apart and probed.
    It runs outermost, so a refused request changes nothing and is never parsed; its body is
    read and dropped (up to `max_bytes`), so the client gets the 401 instead of a reset.
    """

    def __init__(self, app: Any, token: str, max_bytes: int) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes
        self.warned: set[str] = set()  # clients already warned about (one line each)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for key, value in scope["headers"]
                       if key.lower() == b"authorization"), None)
        if bearer_matches(header, self.token):
            await self.app(scope, receive, send)
            return
        client = str((scope.get("client") or ("?",))[0])
        level = logging.DEBUG if client in self.warned else logging.WARNING
        if len(self.warned) < 1000:
            self.warned.add(client)
        log.log(level, "refused %s %s from %s: %s bearer token (401; later refusals of this "
                "client are logged at debug level)", scope.get("method"), scope.get("path"),
                client, "wrong" if header else "no")
        dropped, more = 0, True
        while more and dropped <= self.max_bytes:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)
        await _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                          f"with the server's shared secret (${API_TOKEN_ENV})",
                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def create_app(max_queue_sequences: int = 4096,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20, queue_db: str = MEMORY,
               lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S,
               api_token: str | None = None) -> FastAPI:
    """Build the API around a TrajectoryQueue (tests and main() both use this): a fresh one,
    or the one stored in the SQLite file `queue_db`. With `api_token` every request must
    carry it as a bearer token (`BearerAuth`)."""
    queue = TrajectoryQueue(max_queue_sequences, queue_db, lease_timeout)
    app = FastAPI(title="example-trainer trajectory API (Atropos run-api protocol)")
    app.state.queue = queue
    app.add_middleware(RequestBodyLimit, max_bytes=max_request_bytes)
    if api_token:  # added last, so it runs first: before the body is read or parsed
        app.add_middleware(BearerAuth, token=api_token, max_bytes=max_request_bytes)

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
    async def register(reg: TrainerRegistration) -> dict[str, Any]:
        # {"uuid"} as run-api answers, plus queue_id and leases (Atropos ignores them).
        return queue.register_trainer(reg)

    @app.post("/register-env")
    async def register_env(reg: EnvRegistration) -> dict[str, Any]:
        return queue.register_env(reg)

    @app.post("/disconnect-env")
    async def disconnect_env(ref: EnvRef) -> dict[str, str]:
        queue.disconnect_env(ref.env_id)
        return {"status": "success"}

    @app.get("/wandb_info")
    async def wandb_info() -> dict[str, Any]:
        trainer = queue.trainer
        return {"group": trainer.wandb_group if trainer else None,
                "project": trainer.wandb_project if trainer else None}

    @app.get("/info")
    async def info() -> dict[str, int]:
        trainer = queue.trainer
        return {"batch_size": trainer.batch_size if trainer else -1,
                "max_token_len": trainer.max_token_len if trainer else -1}

    @app.get("/batch")
    async def batch(ack: str | None = None, commit: str | None = None) -> JSONResponse:
        """`ack`/`commit` (lease trainers only): leases up to that id are trained /
        covered by a checkpoint, sent with the next poll so they cost no round trip."""
        groups, lease_id = queue.take_batch(ack=ack, commit=commit)
        body: dict[str, Any] = {"batch": groups}
        if lease_id is not None:
            body["lease_id"] = lease_id
        # JSONResponse directly: skips jsonable_encoder's slow walk over big token lists.
        return JSONResponse(body)

    @app.post("/batch/ack")
    async def batch_ack(body: LeaseAck) -> dict[str, str]:
        """The same acknowledgement without taking a batch (a trainer's last words)."""
        queue.acknowledge(body.ack, body.commit)
        return {"status": "ok"}

    @app.post("/scored_data")
    async def scored_data(group: ScoredData, key: PostKey = None) -> dict[str, Any]:
        stored = queue.post_groups([group], as_list=False, key=key)
        return {"status": "received", **({} if stored else {"duplicate": True})}

    @app.post("/scored_data_list")
    async def scored_data_list(groups: list[ScoredData], key: PostKey = None) -> dict[str, Any]:
        stored = queue.post_groups(groups, as_list=True, key=key)
        processed = len(groups) if stored else 0
        return {"status": "received", "groups_processed": processed, "groups": processed,
                **({} if stored else {"duplicate": True})}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return queue.status()

    @app.post("/weight_version")
    async def weight_version(body: WeightVersion) -> dict[str, Any]:
        """Environments read it from /status and tag each group with the version it was
        sampled under, so the trainer can measure (and bound) off-policy staleness."""
        queue.set_weight_version(body.version)
        return {"status": "ok", "weight_version": body.version}

    @app.get("/status-env")
    async def status_env(request: Request, env_id: int | None = None) -> dict[str, Any]:
        if env_id is None:
            env_id = (await _optional_json(request)).get("env_id")
        if not isinstance(env_id, int) or isinstance(env_id, bool):
            raise GroupError("env_id is required as an integer: ?env_id=N or a JSON body "
                             '{"env_id": N}')
        return queue.env_status(env_id)

    @app.get("/latest_example")
    async def latest_example() -> JSONResponse:
        return JSONResponse(queue.latest_example or {})

    @app.get("/reset_data")
    async def reset_data() -> dict[str, str]:
        queue.reset()
        log.info("state reset: queue, environments, trainer registration and step cleared")
        return {"status": "reset"}

    @app.post("/training_finished")
    async def training_finished(request: Request) -> dict[str, Any]:
        reason = (await _optional_json(request)).get("reason") or "unspecified"
        queue.finish(str(reason))
        return {"status": "finished", "reason": str(reason)}

    return app
