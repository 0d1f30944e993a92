"""A bearer-token check on every route of vLLM's server, dev-mode routes included.

vLLM's own `--api-key` (or VLLM_API_KEY) guards only paths under /v1, /v2, /inference and
/cohere (vLLM 0.32, `entrypoints/serve/middleware/authenticate.py`). The trainer runs vLLM in
dev mode, whose /collective_rpc calls any worker method, and /pause, /resume,
/reset_prefix_cache and the weight-transfer routes change what it serves: with the key alone
all of them stay open. `VLLMServer` therefore starts vLLM with `--middleware
example_trainer.vllm.auth.RequireApiKey`, which vLLM imports in its API process and which
refuses (401) every request without `Authorization: Bearer $VLLM_API_KEY`, except GET
/health: it reveals nothing, and liveness checks and vLLM's own start-up probe it.

A user starting vLLM themselves does the same:
`VLLM_API_KEY=... VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server ...
--middleware example_trainer.vllm.auth.RequireApiKey`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from environments.transport import bearer_matches

log = logging.getLogger(__name__)

KEY_ENV = "VLLM_API_KEY"  # vLLM's own variable for --api-key: one setting for both checks
OPEN_PATHS = frozenset({"/health"})


class RequireApiKey:
    """ASGI middleware (vLLM adds it with `app.add_middleware`, hence no arguments): every
    request but GET /health must carry `Authorization: Bearer $VLLM_API_KEY`.

    Without VLLM_API_KEY it refuses to build, so a misconfigured server fails to start rather
    than running open."""

    def __init__(self, app: Any) -> None:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            raise RuntimeError(f"{__name__}.RequireApiKey needs {KEY_ENV} set to the key "
                               "clients send")
        self.app, self.key = app, key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or (
                kind == "http" and scope.get("method") in ("GET", "HEAD")
                and scope.get("path") in OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for key, value in scope.get("headers", ())
                       if key.lower() == b"authorization"), None)
        if bearer_matches(header, self.key):
            await self.app(scope, receive, send)
            return
        log.debug("refused %s %s: no or wrong API key", scope.get("method"), scope.get("path"))
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        body = b'{"error": "Unauthorized: send Authorization: Bearer <API key>"}'
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
