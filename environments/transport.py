"""HTTP plumbing the trajectory-API client and the vLLM sampler share."""

from __future__ import annotations

import threading
import time

import requests


class Stopped(Exception):
    """Training finished (or `Environment.stop()` was called) while waiting or retrying."""


class Backoff:
    """Exponential backoff with a cap; `sleep()` waits and doubles."""

    def __init__(self, first: float = 0.25, cap: float = 5.0) -> None:
        self.delay, self.cap = first, cap

    def sleep(self) -> float:
        slept = self.delay
        time.sleep(slept)
        self.delay = min(self.delay * 2, self.cap)
        return slept


class ThreadSessions:
    """One `requests.Session` per thread: sessions are not thread-safe, and the runner
    samples from several worker threads at once (`concurrency`)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session


def retry_after_seconds(response: requests.Response, default: float = 1.0) -> float:
    """Seconds from a Retry-After header (numeric form), clamped to [0.05, 60]."""
    try:
        value = float(response.headers.get("Retry-After", default))
    except ValueError:
        value = default
    return min(max(value, 0.05), 60.0)
