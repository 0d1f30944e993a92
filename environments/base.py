"""Write a task here: subclass `Environment` and implement `get_prompt` and `score`.

    class MyEnv(Environment):
        def get_prompt(self, rng):           # one training item, drawn with the seeded rng
            return Item(messages=[{"role": "user", "content": "..."}], answer=...)

        def score(self, item, completion_text):  # reward of one completion, a finite float
            return 1.0 if ... else 0.0

    MyEnv(EnvConfig(api_url=..., vllm_url=..., tokenizer=DIR)).run()

Optional hooks: `eval_score` (held-out accuracy when the training reward is shaped),
`eval_items` (a held-out set for `evaluate`), `prompt_ids` (a different prompt format).
Everything else is composed here from two parts, and talks HTTP only (`requests`), so an
environment is its own process and never imports the trainer, as in Atropos:

- `api_client.TrajectoryClient`: register, back-pressure (no sampling while this environment
  has `max_queued_groups` groups waiting in the API, so a slow trainer trains on fresh
  rollouts), post with retries, the explicit training-finished signal;
- `sampling.VLLMSampler`: completions by token ids with their log-probs, retried while vLLM
  restarts or aborts requests.

Options and the command line are in `config` (`EnvConfig`, `add_common_args`).
"""

from __future__ import annotations

import logging
import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from .api_client import ApiUnavailable, TrajectoryClient, build_scored_group, queued_sequences
from .config import EnvConfig, EnvStats, add_common_args, config_from_args, setup_logging
from .sampling import (Completion, MalformedResponse, ModelNameCheck, ModelNotServed,
                       VLLMRequestError, VLLMSampler, VLLMUnavailable, parse_choice)
from .transport import Stopped

__all__ = ["ApiUnavailable", "Completion", "EnvConfig", "EnvStats", "Environment", "Item",
           "MalformedResponse", "ModelNameCheck", "ModelNotServed", "VLLMRequestError",
           "VLLMUnavailable", "add_common_args",
           "build_scored_group", "config_from_args", "parse_choice", "queued_sequences",
           "scores_all_equal", "setup_logging"]

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One prompt: the chat messages to sample from and what `score` needs to judge them."""
    messages: list[dict[str, str]]
    answer: Any = None


def scores_all_equal(scores: Sequence[float]) -> bool:
    """True when a group has no GRPO signal (every advantage would be zero)."""
    return all(s == scores[0] for s in scores)


class Environment:
    """Base class of a task: subclass and implement `get_prompt` and `score`.

    `run()` registers, samples, scores and posts until training finishes (or `max_groups`);
    `evaluate()` measures accuracy on held-out items without touching the trajectory API.
    """

    def __init__(self, config: EnvConfig, tokenizer: Any = None) -> None:
        self.config = config
        self.stats = EnvStats()
        self.rng = random.Random(config.seed)
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers can fail "Already borrowed"
        self._stop = threading.Event()
        self.api = TrajectoryClient(config, self.stats, self._lock, self._stop)
        self.sampler = VLLMSampler(config, self.stats, self._lock,
                                   should_stop=self.api.training_finished)

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

    # --- tokenizer ------------------------------------------------------------------------

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

    def _stop_token_ids(self) -> list[int]:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [int(eos)] if eos is not None else []

    # --- the trajectory API (see api_client) ----------------------------------------------

    @property
    def env_id(self) -> int | None:
        """The id the API gave this environment; None while unregistered."""
        return self.api.env_id

    @property
    def max_token_length(self) -> int:
        """Configured limit, lowered to the trainer's `max_token_len` at registration."""
        return self.api.max_token_length

    def register(self) -> bool:
        """Register with the API (waits for the trainer); False if training finished."""
        return self.api.register()

    def wait_for_room(self) -> bool:
        """Block while this env's queue in the API is full; False once training finished."""
        return self.api.wait_for_room()

    def post_group(self, group: dict[str, Any]) -> bool:
        """POST one group, re-posted on 429; False if rejected or training finished."""
        return self.api.post_group(group)

    def disconnect(self) -> None:
        """Tell the API this environment is gone (best effort)."""
        self.api.disconnect()

    # --- vLLM (see sampling) --------------------------------------------------------------

    def _completion_request(self, prompts: list[list[int]], *, n: int, max_tokens: int,
                            temperature: float, logprobs: bool) -> dict[str, Any]:
        """The /v1/completions body; a subclass may add vLLM options (e.g. ignore_eos)."""
        return self.sampler.completion_body(prompts, n=n, max_tokens=max_tokens,
                                            temperature=temperature, logprobs=logprobs,
                                            stop_token_ids=self._stop_token_ids())

    def sample(self, prompt_ids: list[int], max_tokens: int) -> list[Completion]:
        """`group_size` completions of one prompt, with sampled ids and log-probs."""
        body = self._completion_request([prompt_ids], n=self.config.group_size,
                                        max_tokens=max_tokens,
                                        temperature=self.config.temperature, logprobs=True)
        return self.sampler.sample(body, self.config.group_size)

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
        version = self.api.weight_version()
        group = self.score_group(item, prompt_ids, self.sample(prompt_ids, max_tokens))
        if group is None:
            return True
        if version is not None:
            group["weight_version"] = version
        if not self.post_group(group):
            return not self.api.training_finished()
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
        except Stopped:
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
        except Stopped:
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
            choices = self.sampler.complete(body, len(chunk))
            total += sum(float(self.eval_score(item, c.get("text") or ""))
                         for item, c in zip(chunk, choices))
        accuracy = total / len(items)
        log.info("evaluated %d items at T=%.2f: mean score %.4f", len(items), temperature,
                 accuracy)
        return accuracy
