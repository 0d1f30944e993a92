"""Sampling from vLLM's OpenAI server by token ids, with retries.

Prompts go to /v1/completions as token ids and come back as sampled token ids with their
log-probs (`return_tokens_as_token_ids`), so what the trainer trains on is exactly what vLLM
sampled: no re-tokenisation of text. A request that fails (503, connection refused while the
server restarts, a LoRA adapter not loaded yet) or comes back with an aborted choice (a weight
update paused vLLM with `mode=abort`) is sent again for the whole group, counted in
`stats.retried`, until `vllm_retry_timeout`.

A 404 can also mean a model name vLLM will never serve (a typo in --model-name): then
`ModelNameCheck` ends the retries once /v1/models has answered without that name for
`model_name_grace` seconds, naming what vLLM does serve.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from .config import EnvConfig, EnvStats
from .transport import API_TOKEN_ENV, Backoff, Stopped, ThreadSessions, api_token, bearer_headers

log = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"


class VLLMUnavailable(RuntimeError):
    """vLLM kept failing (or aborting) a request for longer than `vllm_retry_timeout`."""


class VLLMRequestError(RuntimeError):
    """vLLM rejected a request as invalid (4xx): retrying would not help."""


class ModelNotServed(VLLMRequestError):
    """vLLM answers /v1/models, and has kept lacking the requested name."""


class MalformedResponse(ValueError):
    """A vLLM response lacks what the runner asked for (token ids, log-probs)."""


@dataclass
class Completion:
    """One sampled continuation: its token ids, their log-probs under vLLM, its text."""
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None = None


def parse_token_id(token: str) -> int:
    """'token_id:123' -> 123 (vLLM's form with return_tokens_as_token_ids)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_ID_PREFIX):
        raise MalformedResponse(f"expected a 'token_id:N' token, got {token!r}: send "
                                "return_tokens_as_token_ids=true with logprobs")
    return int(token[len(TOKEN_ID_PREFIX):])


def parse_choice(choice: dict[str, Any]) -> Completion:
    """One /v1/completions choice -> Completion with sampled ids and their log-probs.

    Ids come from `token_ids` when vLLM sent them (return_token_ids), else from the
    'token_id:N' strings of `logprobs.tokens`; they must agree with `token_logprobs`.
    """
    lp = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None:
        if lp.get("tokens") is None:
            raise MalformedResponse("choice has no token ids: request logprobs and "
                                    "return_tokens_as_token_ids")
        ids = [parse_token_id(t) for t in lp["tokens"]]
    logprobs = lp.get("token_logprobs")
    if logprobs is None or len(logprobs) != len(ids):
        raise MalformedResponse(f"choice has {len(ids)} tokens but "
                                f"{None if logprobs is None else len(logprobs)} log-probs")
    if any(x is None or not math.isfinite(x) for x in logprobs):
        raise MalformedResponse("choice has a missing or non-finite log-prob")
    return Completion(token_ids=[int(t) for t in ids], logprobs=[float(x) for x in logprobs],
                      text=choice.get("text") or "", finish_reason=choice.get("finish_reason"))


def sorted_choices(response: dict[str, Any], expected: int) -> list[dict[str, Any]]:
    """Choices in request order (prompt-major, then sample), checked for count."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != expected:
        raise MalformedResponse(f"expected {expected} choices, got {len(choices)}")
    return choices


class ModelNameCheck:
    """Decides, from what /v1/models answered, when a 404 means a name vLLM does not serve.

    In the LoRA modes the trainer registers its adapter a little after vLLM is healthy, and
    in `legacy` vLLM restarts often, so a missing name is fatal only after /v1/models has
    answered `grace` seconds in a row without it. An unreachable vLLM (restarting) never
    counts, and restarts the clock: a new server gets its own grace period; so does a
    request that succeeded in between (`served`). Pure logic on
    observed answers, so tests feed it answers and times.
    """

    def __init__(self, name: str, grace: float) -> None:
        self.name, self.grace = name, grace
        self.lacking_since: float | None = None

    def observe(self, served: list[str] | None, now: float) -> str | None:
        """`served`: the ids /v1/models listed, None if it did not answer. Returns the error
        message when it is time to give up, else None."""
        if served is None or self.name in served:
            self.lacking_since = None
            return None
        if self.lacking_since is None:
            self.lacking_since = now
        if now - self.lacking_since < self.grace:
            return None
        return (f"vLLM serves {', '.join(map(repr, served)) or 'no model'} but not "
                f"{self.name!r} (checked for {now - self.lacking_since:.0f} s; "
                "--model-name-grace): pass --model-name with one of those")

    def served(self) -> None:
        """A request for the name succeeded: the next 404 (lora_hotswap's swap window, say,
        minutes later) starts a new grace period instead of continuing an old one."""
        self.lacking_since = None


class VLLMSampler:
    """vLLM requests for one environment; `should_stop` ends a retry loop early (training
    finished), and `stats.retried` counts every retry."""

    def __init__(self, config: EnvConfig, stats: EnvStats, lock: threading.Lock,
                 should_stop: Callable[[], bool]) -> None:
        self.config, self.stats, self._lock = config, stats, lock
        self._should_stop = should_stop
        # vLLM's --api-key is the run's shared secret too (the trainer starts it so).
        self._sessions = ThreadSessions(bearer_headers(api_token(config.api_token)))
        self._model_name = config.model_name
        self._name_check = ModelNameCheck(config.model_name or "", config.model_name_grace)

    @property
    def model_name(self) -> str:
        """Configured name, else the first model vLLM serves (asked once)."""
        if self._model_name is None:
            models = self.request("GET", "/v1/models")
            self._model_name = models["data"][0]["id"]
            log.info("sampling with vLLM model %r", self._model_name)
        return self._model_name

    def served_models(self) -> list[str] | None:
        """The model ids /v1/models lists, in one quick try; None if it does not answer."""
        try:
            response = self._sessions.session.get(
                self.config.vllm_url.rstrip("/") + "/v1/models", timeout=5)
            if not response.ok:
                return None
            return [str(m.get("id")) for m in response.json().get("data") or []]
        except (requests.RequestException, ValueError, AttributeError):
            return None

    def _check_model_name(self) -> None:
        """After a 404: raise ModelNotServed once the name has been missing long enough."""
        if self.config.model_name is None:  # the name came from /v1/models itself
            return
        served = self.served_models()
        with self._lock:  # worker threads share the check's clock
            message = self._name_check.observe(served, time.monotonic())
        if message is not None:
            raise ModelNotServed(message)

    def request(self, method: str, path: str, json: dict[str, Any] | None = None,
                expected_choices: int | None = None) -> Any:
        """One vLLM request, retried while vLLM is down, busy or aborts a choice.

        Server errors, 404 (an adapter not loaded yet), refused connections and choices with
        finish_reason "abort" are retried with backoff for up to `vllm_retry_timeout`; other
        4xx answers mean a bad request and raise at once, and so does a 404 for a model name
        that vLLM keeps not serving (`ModelNameCheck`). With `expected_choices` the answer
        is its choices in request order, else the JSON body.
        """
        deadline = time.monotonic() + self.config.vllm_retry_timeout
        backoff = Backoff(first=0.5, cap=10.0)
        while True:
            try:
                response = self._sessions.session.request(
                    method, self.config.vllm_url.rstrip("/") + path, json=json,
                    timeout=self.config.request_timeout)
            except requests.RequestException as err:
                reason = f"vLLM unreachable ({type(err).__name__})"
            else:
                if response.ok:
                    if self._name_check.lacking_since is not None:
                        with self._lock:
                            self._name_check.served()
                    answer = response.json()
                    if expected_choices is None:
                        return answer
                    choices = sorted_choices(answer, expected_choices)
                    aborted = sum(c.get("finish_reason") == "abort" for c in choices)
                    if not aborted:
                        return choices
                    reason = f"{aborted} of {len(choices)} choices aborted"
                elif response.status_code >= 500 or response.status_code in (404, 408, 429):
                    reason = f"HTTP {response.status_code}: {response.text[:200]}"
                    if response.status_code == 404:
                        self._check_model_name()
                else:
                    hint = (f" (no or wrong API key: set {API_TOKEN_ENV} or --api-token to the "
                            "key vLLM was started with)" if response.status_code == 401 else "")
                    raise VLLMRequestError(f"vLLM rejected {path} (HTTP "
                                           f"{response.status_code}): {response.text[:500]}"
                                           f"{hint}")
            if self._should_stop():
                raise Stopped
            if time.monotonic() > deadline:
                raise VLLMUnavailable(f"vLLM {self.config.vllm_url}{path} kept failing for "
                                      f"{self.config.vllm_retry_timeout:.0f} s: {reason}")
            with self._lock:
                self.stats.retried += 1
            log.warning("%s; retrying the whole request in %.1f s", reason, backoff.delay)
            backoff.sleep()

    def completion_body(self, prompts: list[list[int]], *, n: int, max_tokens: int,
                        temperature: float, logprobs: bool,
                        stop_token_ids: list[int]) -> dict[str, Any]:
        """A /v1/completions body for token-id prompts; with `logprobs` the answer carries
        sampled ids and their log-probs."""
        body: dict[str, Any] = {
            "model": self.model_name, "prompt": prompts if len(prompts) > 1 else prompts[0],
            "n": n, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": self.config.top_p, "stop_token_ids": stop_token_ids}
        if logprobs:
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        return body

    def complete(self, body: dict[str, Any], expected_choices: int) -> list[dict[str, Any]]:
        """POST /v1/completions (retried); its choices in request order."""
        return self.request("POST", "/v1/completions", json=body,
                            expected_choices=expected_choices)

    def sample(self, body: dict[str, Any], expected_choices: int) -> list[Completion]:
        """Like `complete`, parsed into Completions with sampled ids and log-probs."""
        return [parse_choice(c) for c in self.complete(body, expected_choices)]
