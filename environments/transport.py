"""HTTP plumbing the trajectory-API client, the vLLM sampler and the API server share:
backoff, per-thread sessions, and the shared secret (bearer token) that guards a run's ports
once they leave loopback."""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import threading
import time

import requests


# A post's unique key, sent again with every retry of it: the API stores the groups of a key
# once, so a retry after a lost answer (the post was stored, the reply never came) is not
# trained on twice. Optional on the wire: Atropos' clients send none.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"


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
    samples from several worker threads at once (`concurrency`). `headers` go with every
    request (the bearer token, when the run has a shared secret)."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self._local = threading.local()
        self._headers = dict(headers or {})

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            self._local.session.headers.update(self._headers)
        return self._local.session


def retry_after_seconds(response: requests.Response, default: float = 1.0) -> float:
    """Seconds from a Retry-After header (numeric form), clamped to [0.05, 60]."""
    try:
        value = float(response.headers.get("Retry-After", default))
    except ValueError:
        value = default
    return min(max(value, 0.05), 60.0)


# --- the shared secret ---------------------------------------------------------------------
# One secret guards every HTTP port of a run (the trajectory API and the trainer's vLLM). It
# comes from this environment variable, or from --api-token where a command has the flag. The
# variable is preferred: a flag's value is visible to every user of the machine in `ps`.
API_TOKEN_ENV = "EXAMPLE_TRAINER_API_TOKEN"


def api_token(explicit: str | None = None) -> str | None:
    """The shared secret: `explicit` (a flag's value) if given, else $EXAMPLE_TRAINER_API_TOKEN;
    None when neither is set (surrounding whitespace, as a shell file may leave, is dropped)."""
    value = explicit if explicit is not None else os.environ.get(API_TOKEN_ENV)
    value = (value or "").strip()
    return value or None


def bearer_headers(token: str | None) -> dict[str, str]:
    """The Authorization header carrying `token`; none without one (Atropos' clients send
    none, and a loopback server without a secret asks for none)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header value is `Bearer <token>`, in constant time (a
    byte-by-byte comparison would leak how much of a guess was right)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())


def is_loopback(host: str) -> bool:
    """True when `host` (an address or a name) is reachable only from this machine.

    A wildcard ("0.0.0.0", "::", "") listens on every interface and is not loopback; a name
    counts as loopback only if every address it resolves to is (Debian maps its own host
    name to 127.0.1.1); a name that does not resolve is not."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(
        ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def exposed_without_secret(what: str, host: str, bind_flag: str, *,
                           token_flag: bool = True) -> str:
    """The one line a start-up prints when it refuses a non-loopback bind without a secret:
    the problem, then both ways out."""
    where = f"{API_TOKEN_ENV} (or --api-token)" if token_flag else API_TOKEN_ENV
    return (f"refusing to serve {what} on {host} without a shared secret (anyone who can "
            f"reach that address could use it): set {where} to a long random string in "
            "every process of the run, e.g. `export "
            f"{API_TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`"
            f", or pass {bind_flag} 127.0.0.1")
