"""Environment runner: register with the trajectory API, sample groups from vLLM, score, post.

A task subclasses `Environment` and writes two methods, `get_prompt(rng)` and
`score(item, completion_text)`; everything else (registration, back-pressure, sampling,
retries, ScoredData, stopping) lives here. The runner talks HTTP only (`requests` to the
trajectory API and to vLLM's OpenAI server), so an environment is its own process and never
imports the trainer, as in Atropos.

Robustness rules, each from a failure seen in the systems this project grew from:

- A group is never silently lost. A 429 from the API is answered by sleeping `Retry-After`
  and posting the same group again; a vLLM request that fails (503, connection refused while
  the server restarts) or comes back with an aborted choice (a weight update paused vLLM
  with `mode=abort`) is sent again for the whole group, counted in `stats.retried`.
- The end of training is an explicit signal (`training_finished` from the API, or "finished"
  from /register-env), not inferred from counting samples.
- Back-pressure: the runner does not sample while this environment already has
  `max_queued_groups` groups waiting in the API, so a slow trainer trains on fresh rollouts
  and the API's memory stays bounded.

ScoredData alignment (what the trainer's batch code expects): per sample, `tokens` = prompt +
completion ids; `masks` = -100 on prompt positions and the token id on completion positions;
`inference_logprobs[t]` = vLLM's log-prob of `tokens[t]`, 1.0 on prompt positions.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import requests

log = logging.getLogger(__name__)

TOKEN_ID_PREFIX = "token_id:"


class ApiUnavailable(RuntimeError):
    """The trajectory API did not answer within `api_timeout`."""


class VLLMUnavailable(RuntimeError):
    """vLLM kept failing (or aborting) a request for longer than `vllm_retry_timeout`."""


class VLLMRequestError(RuntimeError):
    """vLLM rejected a request as invalid (4xx): retrying would not help."""


class MalformedResponse(ValueError):
    """A vLLM response lacks what the runner asked for (token ids, log-probs)."""


class _Stopped(Exception):
    """Internal: training finished (or `stop()` was called) while waiting or retrying."""


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One prompt: the chat messages to sample from and what `score` needs to judge them."""
    messages: list[dict[str, str]]
    answer: Any = None


@dataclass
class Completion:
    """One sampled continuation: its token ids, their log-probs under vLLM, its text."""
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None = None


@dataclass
class EnvStats:
    """Counters a run reports; `retried` and `dropped_equal` show where rollouts went."""
    groups_sampled: int = 0
    posted: int = 0
    dropped_equal: int = 0
    retried: int = 0
    post_waits: int = 0
    rejected: int = 0
    skipped_long: int = 0
    samples: int = 0
    completion_tokens: int = 0
    reward_sum: float = 0.0

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.samples if self.samples else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "mean_reward": self.mean_reward}


def opt(default: Any, help: str) -> Any:
    """A dataclass field carrying its CLI help text (flags are generated from the fields)."""
    return field(default=default, metadata={"help": help})


@dataclass
class EnvConfig:
    """Every runner option; `add_common_args` turns each field into a --flag."""

    api_url: str = opt("http://127.0.0.1:8000", "Trajectory API (Atropos run-api protocol).")
    vllm_url: str = opt("http://127.0.0.1:9001", "vLLM OpenAI-compatible server.")
    model_name: str | None = opt(None, "Model (or LoRA adapter) name to sample with; default: "
                                 "the first model vLLM lists at /v1/models.")
    tokenizer: str | None = opt(None, "Tokenizer directory or id for the chat template; "
                                "default: --model-name.")
    group_size: int = opt(8, "Completions sampled per prompt (one GRPO group).")
    temperature: float = opt(1.0, "Sampling temperature (sent to the trainer in "
                             "generation_params).")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    max_tokens: int = opt(64, "Most tokens generated per completion.")
    max_token_length: int = opt(512, "Most tokens per sequence (prompt + completion); "
                                "max_tokens is clipped to fit.")
    desired_name: str = opt("env", "Name this environment registers under.")
    weight: float = opt(1.0, "Sampling weight of this environment in mixed batches.")
    max_queued_groups: int = opt(4, "Pause sampling while this many of this environment's "
                                 "groups wait in the API (back-pressure).")
    max_groups: int | None = opt(None, "Stop after posting this many groups (default: run "
                                 "until the trainer signals training_finished).")
    concurrency: int = opt(1, "Groups sampled at once (vLLM batches them); posts may overshoot "
                           "max_groups by up to concurrency-1.")
    seed: int = opt(0, "Seed of the prompt generator.")
    drop_equal_groups: bool = opt(True, "Drop groups whose scores are all equal (no GRPO "
                                  "signal).")
    include_messages: bool = opt(True, "Send the chat messages with each group (for "
                                 "inspection; the trainer uses tokens).")
    api_timeout: float = opt(600.0, "Seconds to keep retrying an unreachable API.")
    vllm_retry_timeout: float = opt(900.0, "Seconds to keep retrying a failing or aborted "
                                    "vLLM request before giving up.")
    request_timeout: float = opt(600.0, "Seconds one HTTP request may take (a CPU generation "
                                 "can take minutes).")
    poll_interval: float = opt(0.5, "Seconds between back-pressure checks while the queue is "
                               "full.")
    eval_batch_size: int = opt(64, "Prompts per /v1/completions call in evaluate().")


# ------------------------------------------------------------------------------------------
# Pure functions: vLLM responses -> completions -> ScoredData
# ------------------------------------------------------------------------------------------

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


def scores_all_equal(scores: Sequence[float]) -> bool:
    return all(s == scores[0] for s in scores)


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
    Atropos' `self_queue_size`, which counts groups of this environment's size. None when the
    answer says neither.
    """
    for key in ("env_queue_size", "num_self_sequences_in_queue"):
        if isinstance(status.get(key), (int, float)):
            return int(status[key])
    if isinstance(status.get("self_queue_size"), (int, float)):
        return int(status["self_queue_size"]) * group_size
    return None


def retry_after_seconds(response: requests.Response, default: float = 1.0) -> float:
    """Seconds from a Retry-After header (numeric form), clamped to [0.05, 60]."""
    try:
        value = float(response.headers.get("Retry-After", default))
    except ValueError:
        value = default
    return min(max(value, 0.05), 60.0)


class _Backoff:
    """Exponential backoff with a cap; `sleep()` waits and doubles."""

    def __init__(self, first: float = 0.25, cap: float = 5.0) -> None:
        self.delay, self.cap = first, cap

    def sleep(self) -> float:
        slept = self.delay
        time.sleep(slept)
        self.delay = min(self.delay * 2, self.cap)
        return slept


# ------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------

class Environment:
    """Base class of a task: subclass and implement `get_prompt` and `score`.

    `run()` registers, samples, scores and posts until training finishes (or `max_groups`);
    `evaluate()` measures accuracy on held-out items without touching the trajectory API.
    """

    def __init__(self, config: EnvConfig, tokenizer: Any = None) -> None:
        self.config = config
        self.stats = EnvStats()
        self.rng = random.Random(config.seed)
        self.env_id: int | None = None
        self._tokenizer = tokenizer
        self._local = threading.local()  # one requests.Session per worker thread
        self._model_name = config.model_name
        self.max_token_length = config.max_token_length  # lowered to the trainer's if smaller
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers can fail "Already borrowed"
        self._stop = threading.Event()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    # --- the task: override these ---------------------------------------------------------

    def get_prompt(self, rng: random.Random) -> Item:
        """Draw one training item with `rng` (seeded, so runs are reproducible)."""
        raise NotImplementedError

    def score(self, item: Item, completion_text: str) -> float:
        """Reward of one completion (a finite float)."""
        raise NotImplementedError

    def eval_score(self, item: Item, completion_text: str) -> float:
        """Score used by `evaluate()`; override when the training reward is shaped (partial
        credit) and held-out accuracy must count exact answers only."""
        return self.score(item, completion_text)

    # --- tokenizer and model --------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            source = self.config.tokenizer or self.config.model_name
            if not source:
                raise ValueError("pass --tokenizer (a directory with the chat template)")
            self._tokenizer = AutoTokenizer.from_pretrained(source)
        return self._tokenizer

    def prompt_ids(self, item: Item) -> list[int]:
        """Chat-template token ids ending in the assistant header.

        transformers 5 returns a BatchEncoding from `tokenize=True` unless
        `return_dict=False`; older versions reject that argument, so both forms are handled.
        """
        kwargs = dict(add_generation_prompt=True, tokenize=True)
        with self._tokenizer_lock:
            try:
                ids = self.tokenizer.apply_chat_template(item.messages, return_dict=False,
                                                         **kwargs)
            except TypeError:
                ids = self.tokenizer.apply_chat_template(item.messages, **kwargs)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(t) for t in ids]

    @property
    def model_name(self) -> str:
        """Configured name, else the first model vLLM serves (asked once)."""
        if self._model_name is None:
            models = self._vllm_call("GET", "/v1/models")
            self._model_name = models["data"][0]["id"]
            log.info("sampling with vLLM model %r", self._model_name)
        return self._model_name

    def _stop_token_ids(self) -> list[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [int(eos)] if eos is not None else []

    # --- trajectory API -------------------------------------------------------------------

    def _api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One API request, retried with backoff while the API is unreachable or 5xx."""
        deadline = time.monotonic() + self.config.api_timeout
        backoff = _Backoff()
        while True:
            try:
                response = self.session.request(method, self.config.api_url.rstrip("/") + path,
                                                timeout=self.config.request_timeout, **kwargs)
                if response.status_code < 500:
                    return response
                reason = f"HTTP {response.status_code}"
            except requests.RequestException as err:
                reason = type(err).__name__
            if self._stop.is_set():
                raise _Stopped
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
        backoff, waits = _Backoff(first=0.2, cap=2.0), 0
        while True:
            response = self._api("POST", "/register-env", json=body)
            response.raise_for_status()
            answer = response.json()
            status = answer.get("status")
            if status == "success":
                self.env_id = int(answer["env_id"])
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
            info = self._api("GET", "/info").json()
        except (requests.RequestException, ValueError):
            return
        trainer_max = info.get("max_token_len")
        if isinstance(trainer_max, int) and 0 < trainer_max < self.max_token_length:
            log.info("trainer's max_token_len %d < %d: using it", trainer_max,
                     self.max_token_length)
            self.max_token_length = trainer_max

    def disconnect(self) -> None:
        """Tell the API this environment is gone (best effort: it may be down already)."""
        if self.env_id is None:
            return
        try:
            self.session.post(self.config.api_url.rstrip("/") + "/disconnect-env",
                              json={"env_id": self.env_id}, timeout=5)
        except requests.RequestException as err:
            log.debug("disconnect-env failed: %s", err)
        self.env_id = None

    def _training_finished(self) -> bool:
        """Cheap check of /status; an unreachable API is not taken as finished."""
        if self._stop.is_set():
            return True
        if self.env_id is None:
            return False
        try:
            response = self.session.get(self.config.api_url.rstrip("/") + "/status", timeout=5)
            return bool(response.ok and response.json().get("training_finished"))
        except (requests.RequestException, ValueError):
            return False

    def weight_version(self) -> int | None:
        """The weight version the trainer last published (None if it publishes none).

        Read just before sampling, so a group's tag is the oldest policy that can have
        produced it: with the trainer's `wait` sync it is exact unless a swap lands while the
        request is queued, with `none` the rollout may continue under newer weights."""
        try:
            response = self.session.get(self.config.api_url.rstrip("/") + "/status", timeout=5)
            version = response.json().get("weight_version") if response.ok else None
        except (requests.RequestException, ValueError):
            return None
        return version if isinstance(version, int) else None

    def wait_for_room(self) -> bool:
        """Block while this env's queue in the API is full; False once training finished."""
        limit = self.config.max_queued_groups * self.config.group_size
        waited = False
        while True:
            response = self._api("GET", "/status-env", params={"env_id": self.env_id})
            if response.status_code == 404:  # the API restarted and forgot us
                log.warning("API does not know env %s any more; registering again", self.env_id)
                self.env_id = None
                if not self.register():
                    return False
                continue
            response.raise_for_status()
            status = response.json()
            if status.get("training_finished") or self._stop.is_set():
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
        """POST one group; sleep Retry-After and re-post on 429, so the group is not lost.

        Returns False only when the API rejects it as invalid (4xx, a bug worth fixing) or
        training finished meanwhile.
        """
        while True:
            response = self._api("POST", "/scored_data", json=group)
            if response.status_code == 429:
                with self._lock:
                    self.stats.post_waits += 1
                if self._training_finished():
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
                # The API restarted after this group was sampled and forgot us: register
                # again (unless another worker thread already did) and re-post, not drop it.
                if self.env_id == stale:
                    log.warning("API does not know env %s any more; registering again", stale)
                    self.env_id = None
                    if not self.register():
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

    # --- vLLM -----------------------------------------------------------------------------

    def _vllm_call(self, method: str, path: str, json: dict[str, Any] | None = None,
                   expected_choices: int | None = None) -> Any:
        """One vLLM request, retried while vLLM is down, busy or aborts a choice.

        Server errors, 404 (an adapter not loaded yet), refused connections and choices with
        finish_reason "abort" are retried with backoff for up to `vllm_retry_timeout`; other
        4xx answers mean a bad request and raise at once.
        """
        deadline = time.monotonic() + self.config.vllm_retry_timeout
        backoff = _Backoff(first=0.5, cap=10.0)
        while True:
            try:
                response = self.session.request(method, self.config.vllm_url.rstrip("/") + path,
                                                json=json, timeout=self.config.request_timeout)
            except requests.RequestException as err:
                reason = f"vLLM unreachable ({type(err).__name__})"
            else:
                if response.ok:
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
                else:
                    raise VLLMRequestError(f"vLLM rejected {path} (HTTP "
                                           f"{response.status_code}): {response.text[:500]}")
            if self._training_finished():
                raise _Stopped
            if time.monotonic() > deadline:
                raise VLLMUnavailable(f"vLLM {self.config.vllm_url}{path} kept failing for "
                                      f"{self.config.vllm_retry_timeout:.0f} s: {reason}")
            with self._lock:
                self.stats.retried += 1
            log.warning("%s; retrying the whole request in %.1f s", reason, backoff.delay)
            backoff.sleep()

    def _completion_request(self, prompts: list[list[int]], *, n: int, max_tokens: int,
                            temperature: float, logprobs: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name, "prompt": prompts if len(prompts) > 1 else prompts[0],
            "n": n, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": self.config.top_p, "stop_token_ids": self._stop_token_ids()}
        if logprobs:
            body.update(logprobs=0, return_tokens_as_token_ids=True)
        return body

    def sample(self, prompt_ids: list[int], max_tokens: int) -> list[Completion]:
        """`group_size` completions of one prompt, with sampled ids and log-probs."""
        body = self._completion_request([prompt_ids], n=self.config.group_size,
                                        max_tokens=max_tokens,
                                        temperature=self.config.temperature, logprobs=True)
        choices = self._vllm_call("POST", "/v1/completions", json=body,
                                  expected_choices=self.config.group_size)
        return [parse_choice(c) for c in choices]

    def _room_for_completion(self, prompt_len: int, max_tokens: int) -> int:
        return min(max_tokens, self.max_token_length - prompt_len)

    # --- one group ------------------------------------------------------------------------

    def score_group(self, item: Item, prompt_ids: Sequence[int],
                    completions: Sequence[Completion]) -> dict[str, Any] | None:
        """Score completions and build ScoredData; None (counted) when scores are all equal.

        Pure apart from the counters: no network, so tests call it with fake completions.
        """
        scores = [float(self.score(item, c.text)) for c in completions]
        if not all(math.isfinite(s) for s in scores):
            raise ValueError(f"score() returned a non-finite value: {scores}")
        with self._lock:
            self.stats.groups_sampled += 1
            self.stats.samples += len(scores)
            self.stats.reward_sum += sum(scores)
            self.stats.completion_tokens += sum(len(c.token_ids) for c in completions)
            if self.config.drop_equal_groups and scores_all_equal(scores):
                self.stats.dropped_equal += 1
                return None
        messages = None
        if self.config.include_messages:
            messages = [list(item.messages) + [{"role": "assistant", "content": c.text}]
                        for c in completions]
        return build_scored_group(prompt_ids, completions, scores,
                                  temperature=self.config.temperature, env_id=self.env_id,
                                  messages=messages)

    def step(self) -> bool:
        """Sample, score and post one group; False when training finished meanwhile."""
        with self._lock:
            item = self.get_prompt(self.rng)
        prompt_ids = self.prompt_ids(item)
        max_tokens = self._room_for_completion(len(prompt_ids), self.config.max_tokens)
        if max_tokens < 1:
            log.warning("prompt of %d tokens leaves no room under max_token_length %d; "
                        "skipped", len(prompt_ids), self.max_token_length)
            with self._lock:
                self.stats.skipped_long += 1
            return True
        version = self.weight_version()
        group = self.score_group(item, prompt_ids, self.sample(prompt_ids, max_tokens))
        if group is None:
            return True
        if version is not None:
            group["weight_version"] = version
        if not self.post_group(group):
            return not self._training_finished()
        s = self.stats
        log.info("posted group %d (mean score %.3f; %d sampled, %d dropped equal, "
                 "%d retried)", s.posted, sum(group["scores"]) / len(group["scores"]),
                 s.groups_sampled, s.dropped_equal, s.retried)
        return True

    # --- main loop ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to end after the request in flight (thread-safe)."""
        self._stop.set()

    def _done(self, max_groups: int | None) -> bool:
        return self._stop.is_set() or (max_groups is not None
                                       and self.stats.posted >= max_groups)

    def _worker(self, max_groups: int | None) -> None:
        try:
            while not self._done(max_groups):
                if not self.wait_for_room() or self._done(max_groups):
                    break
                if not self.step():
                    break
        except _Stopped:
            pass
        finally:
            self._stop.set()

    def run(self, max_groups: int | None = None) -> EnvStats:
        """Register, then sample/score/post until training finishes or `max_groups` posted."""
        max_groups = max_groups if max_groups is not None else self.config.max_groups
        self._stop.clear()
        _ = self.tokenizer  # load it here: lazy imports of transformers race across threads
        try:
            if not self.register():
                return self.stats
            if self.config.concurrency <= 1:
                self._worker(max_groups)
            else:
                with ThreadPoolExecutor(self.config.concurrency) as pool:
                    futures = [pool.submit(self._worker, max_groups)
                               for _ in range(self.config.concurrency)]
                    for future in futures:
                        future.result()
        except _Stopped:
            pass
        finally:
            self._stop.set()
            self.disconnect()
        log.info("environment stopped: %s", self.stats.as_dict())
        return self.stats

    # --- evaluation -----------------------------------------------------------------------

    def evaluate(self, items: Sequence[Item], temperature: float = 0.0,
                 max_tokens: int | None = None) -> float:
        """Mean score of one completion per item (greedy at T=0), in batched requests."""
        if not items:
            return float("nan")
        max_tokens = max_tokens or self.config.max_tokens
        total = 0.0
        for start in range(0, len(items), self.config.eval_batch_size):
            chunk = items[start:start + self.config.eval_batch_size]
            prompts = [self.prompt_ids(item) for item in chunk]
            room = self._room_for_completion(max(len(p) for p in prompts), max_tokens)
            body = self._completion_request(prompts, n=1, max_tokens=max(room, 1),
                                            temperature=temperature, logprobs=False)
            choices = self._vllm_call("POST", "/v1/completions", json=body,
                                      expected_choices=len(chunk))
            total += sum(float(self.eval_score(item, c.get("text") or ""))
                         for item, c in zip(chunk, choices))
        accuracy = total / len(items)
        log.info("evaluated %d items at T=%.2f: mean score %.4f", len(items), temperature,
                 accuracy)
        return accuracy


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per EnvConfig field (defaults and help come from the dataclass)."""
    group = parser.add_argument_group("environment runner")
    for f in dataclasses.fields(EnvConfig):
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                               default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        group.add_argument(_flag(f.name), type=kind, default=f.default,
                           help=f"{help_text} (default: %(default)s)")
    group.add_argument("--log-level", default="INFO", help="Python logging level.")
    return parser


def config_from_args(args: argparse.Namespace) -> EnvConfig:
    return EnvConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EnvConfig)})


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
