"""An environment's side of the trajectory API: register, back-pressure, post, stop.

The client never loses a group silently: a 429 is answered by sleeping `Retry-After` and
posting the same group again, and an API that restarted and forgot this environment (404 from
/status-env, 422 "not a registered environment" for a post) is registered with again and the
group re-posted under the new env_id. The end of training is an explicit signal
(`training_finished` in /status, "finished" from /register-env, 409 for a post), not inferred
from counting samples. Atropos' run-api has no such signal (nor POST /training_finished):
against it training is over when its `current_step` reaches the trainer's `num_steps`, as
Atropos' BaseEnv decides (`finished_in`).

ScoredData alignment (what the trainer's batch code expects, built by `build_scored_group`):
per sample, `tokens` = prompt + completion ids; `masks` = -100 on prompt positions and the
token id on completion positions; `inference_logprobs[t]` = vLLM's log-prob of `tokens[t]`,
1.0 on prompt positions.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import requests

from .config import EnvConfig, EnvStats
from .sampling import Completion
from .transport import (API_TOKEN_ENV, IDEMPOTENCY_KEY_HEADER, Backoff, Stopped,
                        ThreadSessions, api_token, bearer_headers, retry_after_seconds)

log = logging.getLogger(__name__)


class ApiUnavailable(RuntimeError):
    """The trajectory API did not answer within `api_timeout`."""


class ApiUnauthorized(ApiUnavailable):
    """The API answered 401: it has a shared secret and this environment sent none, or
    another one. Retrying cannot help, so the runner ends with this one line."""


def build_scored_group(prompt_ids: Sequence[int], completions: Sequence[Completion],
                       scores: Sequence[float], *, temperature: float,
                       env_id: int | None = None,
                       messages: list[list[dict[str, str]]] | None = None) -> dict[str, Any]:
    """One ScoredData dict (Atropos format), every per-token list aligned with `tokens`."""
    if len(completions) != len(scores):
        raise ValueError(f"{len(completions)} completions but {len(scores)} scores")
    prompt = [int(t) for t in prompt_ids]
    group: dict[str, Any] = {"tokens": [], "masks": [], "inference_logprobs": [],
                             "scores": [float(s) for s in scores],
                             "generation_params": {"temperature": float(temperature)}}
    for c in completions:
        if len(c.token_ids) != len(c.logprobs):
            raise ValueError(f"completion has {len(c.token_ids)} tokens and "
                             f"{len(c.logprobs)} log-probs")
        group["tokens"].append(prompt + list(c.token_ids))
        group["masks"].append([-100] * len(prompt) + list(c.token_ids))
        group["inference_logprobs"].append([1.0] * len(prompt) + list(c.logprobs))
    if messages is not None:
        group["messages"] = messages
    if env_id is not None:
        group["env_id"] = env_id
    return group


def queued_sequences(status: dict[str, Any], group_size: int) -> int | None:
    """This environment's sequences waiting in the API, from a /status-env answer.

    Prefers an explicit sequence count (`env_queue_size` from this project's API), else
    Atropos' `self_queue_size`, which counts groups of this environment's size. Never
    `queue_size`: in /status-env it counts groups, other environments' included. None when
    the answer says neither.
    """
    for key in ("env_queue_size", "num_self_sequences_in_queue"):
        if isinstance(status.get(key), (int, float)):
            return int(status[key])
    if isinstance(status.get("self_queue_size"), (int, float)):
        return int(status["self_queue_size"]) * group_size
    return None


class TrajectoryClient:
    """One environment's registration with the API and the requests made under it.

    `stop` is the runner's stop event: set, it ends waits and retries (`Stopped`); a 409 for a
    post sets it. `max_token_length` starts at the configured value and is lowered to the
    trainer's at registration, so no group is rejected as too long.
    """

    def __init__(self, config: EnvConfig, stats: EnvStats, lock: threading.Lock,
                 stop: threading.Event) -> None:
        self.config, self.stats, self._lock, self._stop = config, stats, lock, stop
        self._sessions = ThreadSessions(bearer_headers(api_token(config.api_token)))
        self.env_id: int | None = None
        self.max_token_length = config.max_token_length
        self.num_steps: int | None = None  # the trainer's, from /register-env
        self._warned_no_finish_signal = False

    def _url(self, path: str) -> str:
        return self.config.api_url.rstrip("/") + path

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One API request, retried with backoff while the API is unreachable or 5xx."""
        deadline = time.monotonic() + self.config.api_timeout
        backoff = Backoff()
        while True:
            try:
                response = self._sessions.session.request(
                    method, self._url(path), timeout=self.config.request_timeout, **kwargs)
                if response.status_code == 401:
                    raise ApiUnauthorized(
                        f"trajectory API {self.config.api_url} refused {method} {path} (401: "
                        f"no or wrong bearer token): set {API_TOKEN_ENV} (or --api-token) to "
                        "the server's shared secret")
                if response.status_code < 500:
                    return response
                reason = f"HTTP {response.status_code}"
            except requests.RequestException as err:
                reason = type(err).__name__
            if self._stop.is_set():
                raise Stopped
            if time.monotonic() > deadline:
                raise ApiUnavailable(f"trajectory API {self.config.api_url}{path} failed for "
                                     f"{self.config.api_timeout:.0f} s ({reason})")
            log.warning("trajectory API %s %s failed (%s); retrying", method, path, reason)
            backoff.sleep()

    def register(self) -> bool:
        """Register with the API; False when training has already finished.

        The API answers "wait for trainer to start" until the trainer's first /batch, so
        this polls with backoff (the environment may be started before the trainer).
        """
        cfg = self.config
        body = {"max_token_length": cfg.max_token_length, "desired_name": cfg.desired_name,
                "weight": cfg.weight, "group_size": cfg.group_size}
        backoff, waits = Backoff(first=0.2, cap=2.0), 0
        while True:
            response = self.request("POST", "/register-env", json=body)
            response.raise_for_status()
            answer = response.json()
            status = answer.get("status")
            if status == "success":
                self.env_id = int(answer["env_id"])
                steps = answer.get("num_steps")
                self.num_steps = steps if isinstance(steps, int) and steps > 0 else None
                log.info("registered as env %d (%s, group size %d)", self.env_id,
                         cfg.desired_name, cfg.group_size)
                self._fit_trainer_limits()
                return True
            if status == "finished":
                log.info("training already finished; not registering")
                return False
            if self._stop.is_set():
                return False
            waits += 1
            if waits in (1, 30) or waits % 300 == 0:
                log.info("waiting for the trainer to start (%s)", status)
            backoff.sleep()

    def _fit_trainer_limits(self) -> None:
        """Lower max_token_length to the trainer's, so no group is rejected as too long."""
        try:
            info = self.request("GET", "/info").json()
        except (requests.RequestException, ValueError):
            return
        trainer_max = info.get("max_token_len")
        if isinstance(trainer_max, int) and 0 < trainer_max < self.max_token_length:
            log.info("trainer's max_token_len %d < %d: using it", trainer_max,
                     self.max_token_length)
            self.max_token_length = trainer_max

    def _register_again(self, stale: int | None) -> bool:
        """The API restarted and forgot env `stale`: register again (unless another worker
        thread already did); False when training finished meanwhile."""
        if self.env_id != stale:
            return True
        log.warning("API does not know env %s any more; registering again", stale)
        self.env_id = None
        return self.register()

    def disconnect(self) -> None:
        """Tell the API this environment is gone (best effort: it may be down already)."""
        if self.env_id is None:
            return
        try:
            self._sessions.session.post(self._url("/disconnect-env"),
                                        json={"env_id": self.env_id}, timeout=5)
        except requests.RequestException as err:
            log.debug("disconnect-env failed: %s", err)
        self.env_id = None

    def _status(self) -> dict[str, Any] | None:
        """/status in one quick try; None when the API does not answer."""
        try:
            response = self._sessions.session.get(self._url("/status"), timeout=5)
            return response.json() if response.ok else None
        except (requests.RequestException, ValueError):
            return None

    def finished_in(self, status: dict[str, Any]) -> bool:
        """Whether a /status or /status-env answer says training is over.

        This project's API says so (`training_finished`). Atropos' run-api cannot: there it
        is over once the trainer has taken its last batch (`current_step >= num_steps`), and
        a trainer that stops early goes unseen until vLLM has been gone for
        `vllm_retry_timeout`. Warned about once.
        """
        if "training_finished" in status:
            return bool(status["training_finished"])
        if not self._warned_no_finish_signal:
            self._warned_no_finish_signal = True
            log.warning("trajectory API %s sends no training_finished (Atropos run-api?): "
                        "stopping when its current_step reaches the trainer's num_steps "
                        "(%s)", self.config.api_url, self.num_steps)
        step = status.get("current_step")
        return isinstance(step, int) and self.num_steps is not None and step >= self.num_steps

    def training_finished(self) -> bool:
        """Cheap check of /status; an unreachable API is not taken as finished."""
        if self._stop.is_set():
            return True
        if self.env_id is None:
            return False
        status = self._status()
        return status is not None and self.finished_in(status)

    def weight_version(self) -> int | None:
        """The weight version the trainer last published (None if it publishes none).

        Read just before sampling, so a group's tag is the oldest policy that can have
        produced it: with the trainer's `wait` sync it is exact unless a swap lands while the
        request is queued, with `none` the rollout may continue under newer weights."""
        version = (self._status() or {}).get("weight_version")
        return version if isinstance(version, int) else None

    def wait_for_room(self) -> bool:
        """Block while this env's queue in the API is full; False once training finished."""
        limit = self.config.max_queued_groups * self.config.group_size
        waited = False
        while True:
            # A JSON body on a GET, as Atropos' clients send it (run-api reads only that).
            response = self.request("GET", "/status-env", json={"env_id": self.env_id})
            if response.status_code == 404:  # the API restarted and forgot us
                if not self._register_again(self.env_id):
                    return False
                continue
            response.raise_for_status()
            status = response.json()
            if self.finished_in(status) or self._stop.is_set():
                return False
            queued = queued_sequences(status, self.config.group_size)
            if queued is None or queued < limit:
                if waited:
                    log.debug("queue has room again (%s sequences)", queued)
                return True
            if not waited:
                log.debug("back-pressure: %d sequences queued (limit %d); waiting", queued,
                          limit)
                waited = True
            time.sleep(self.config.poll_interval)

    def post_group(self, group: dict[str, Any]) -> bool:
        """POST one group; sleep Retry-After and re-post on 429, so the group is not lost, and
        never queued twice: every attempt carries the same Idempotency-Key.

        Returns False only when the API rejects it as invalid (4xx, a bug worth fixing) or
        training finished meanwhile.
        """
        # One key for every attempt: a retry after a lost answer must not queue it twice.
        headers = {IDEMPOTENCY_KEY_HEADER: uuid.uuid4().hex}
        while True:
            response = self.request("POST", "/scored_data", json=group, headers=headers)
            if response.status_code == 429:
                with self._lock:
                    self.stats.post_waits += 1
                if self.training_finished():
                    return False
                time.sleep(retry_after_seconds(response))
                continue
            if response.ok:
                with self._lock:
                    self.stats.posted += 1
                return True
            stale = group.get("env_id")
            if (response.status_code == 422 and stale is not None
                    and "not a registered environment" in response.text):
                # Sampled before the API restarted: re-post under the new id, not drop it.
                if not self._register_again(stale):
                    return False
                group = {**group, "env_id": self.env_id}
                continue
            if response.status_code == 409:  # training finished: data has nowhere to go
                log.info("API no longer accepts data: %s", response.text[:200])
                self._stop.set()
                return False
            log.error("API rejected a group (HTTP %d): %s", response.status_code,
                      response.text[:500])
            with self._lock:
                self.stats.rejected += 1
            return False
