"""A cheap liveness check of vLLM for loops that wait on it only indirectly."""

from __future__ import annotations

import logging
import time
from typing import Callable

import requests

from .server import VLLMGone, VLLMServer

log = logging.getLogger(__name__)


class HealthWatch:
    """A cheap, rate-limited liveness check for loops that wait on vLLM indirectly.

    While the trainer waits for data it depends on vLLM (the environment samples from it),
    yet a dead or hung server would only surface as a batch timeout many minutes later.
    Calling the watch from the wait loop turns that into a clear error: at once when the
    server we started has exited (with its last log lines), or once `/health` has failed
    for `timeout_s` in a row (a hung or unreachable server). With `on_failure` (the trainer's
    --restart-vllm-on-failure) a server we started is not given up: the hook gets the same
    message, restarts it and resyncs the weights, and may itself raise VLLMGone."""

    def __init__(self, url: str, *, timeout_s: float, server: VLLMServer | None = None,
                 interval_s: float = 2.0,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.url, self.server = url.rstrip("/"), server
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.on_failure = on_failure if server is not None else None
        self._last_check = 0.0
        self._failing_since: float | None = None

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self._last_check < self.interval_s:
            return
        self._last_check = now
        server = self.server
        code = server.exit_code() if server is not None else None
        if code is not None:
            self._fail(server.failure_message(f"vLLM exited with code {code} during training"))
            return
        try:
            healthy = requests.get(f"{self.url}/health", timeout=min(5.0, self.timeout_s)).ok
        except requests.RequestException:
            healthy = False
        if healthy:
            self._failing_since = None
            return
        self._failing_since = self._failing_since or now
        if time.monotonic() - self._failing_since >= self.timeout_s:
            self._fail(f"vLLM at {self.url} has not answered /health for "
                       f"{time.monotonic() - self._failing_since:.0f} s (--sync-timeout "
                       f"{self.timeout_s:.0f}): the server hangs or is gone; see its log")

    def _fail(self, message: str) -> None:
        if self.on_failure is None:
            # Said now, because stopping the other children can take a while after this.
            log.error("%s; stopping the run", message.splitlines()[0])
            raise VLLMGone(message)
        self.on_failure(message)  # restarted: watch the new server from a clean slate
        self._failing_since, self._last_check = None, time.monotonic()
