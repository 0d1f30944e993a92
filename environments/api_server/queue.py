"""The trajectory queue: registrations, scored groups, exact-size batches, run state.

`TrajectoryQueue` is everything the API remembers, behind methods that know nothing of HTTP
(the app maps its exceptions to status codes), so the storage can change (e.g. to SQLite)
without touching the routes. Batches are served oldest first and hold exactly the trainer's
`batch_size` sequences; groups whose sizes cannot pack exactly are split, carrying the whole
group's score mean/std, so no group waits forever. The queue is bounded in sequences.
"""

from __future__ import annotations

import logging
import statistics
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

from .schema import (EnvRegistration, GroupError, ScoredData, TrainerRegistration,
                     check_group)

log = logging.getLogger(__name__)

# Fields that hold one entry per sequence; a split slices all of them the same way.
PER_SEQUENCE_FIELDS = ("tokens", "masks", "scores", "advantages", "ref_logprobs",
                       "inference_logprobs", "messages", "overrides")
# After the oldest group has been passed over by this many exact-fit batches, the next batch
# is filled oldest-first (splitting if needed), so an awkwardly sized group cannot starve.
MAX_PASSED_OVER = 2


class QueueFull(RuntimeError):
    """Accepting the post would exceed max_queue_sequences (HTTP 429, retry later)."""


class TrainingFinished(RuntimeError):
    """Training has ended; more data has nowhere to go (HTTP 409)."""


class UnknownEnv(LookupError):
    """An env_id that was never registered or has disconnected (HTTP 404)."""


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


@dataclass
class _Queued:
    group: dict[str, Any]
    size: int
    passed_over: int = 0


class TrajectoryQueue:
    """Everything the API remembers. Methods never await, so on one event loop each is atomic."""

    def __init__(self, max_queue_sequences: int) -> None:
        self.max_queue_sequences = max_queue_sequences
        self.reset()

    def reset(self) -> None:
        """Forget the queue, environments, trainer registration, step and weight version."""
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
        """Take (or replace) the trainer's registration; clears a finished run."""
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
        """Give an environment its env_id, once the trainer has started polling."""
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
        """The registration of `env_id`; UnknownEnv if there is none."""
        if env_id not in self.envs:
            raise UnknownEnv(f"env_id {env_id} is not registered "
                             f"(registered: {sorted(self.envs)})")
        return self.envs[env_id]

    def disconnect_env(self, env_id: int) -> None:
        reg = self.env(env_id)
        del self.envs[env_id]
        log.info("environment %s_%d disconnected", reg.desired_name, env_id)

    def finish(self, reason: str) -> None:
        """The explicit end of training: later posts get TrainingFinished, /batch nothing."""
        self.finished, self.finish_reason = True, reason
        log.info("training finished (%s) at step %d; %d sequences left in the queue", reason,
                 self.current_step, self.queued_sequences)

    def set_weight_version(self, version: int) -> None:
        """Environments read it from status() and tag each group they sample with it."""
        self.weight_version = version
        log.info("trainer serves weight version %d", version)

    # --- data in --------------------------------------------------------------------------------

    def post_groups(self, groups: list[ScoredData], *, as_list: bool) -> None:
        """Queue all groups or none: validate everything before touching the queue.

        `as_list` prefixes error messages with `groups[k]`, as the list endpoint numbers them.
        """
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

    def take_batch(self) -> list[dict[str, Any]] | None:
        """Exactly batch_size sequences, oldest first, or None if the queue holds too few.

        The first call also opens registration to environments (the trainer has started).
        """
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
        """status() plus this environment's share of the queue (its back-pressure signal)."""
        reg = self.env(env_id)
        own = self.env_sequences(env_id)
        allocated = sum(e.min_batch_allocation or 0.0 for e in self.envs.values())
        return {**self.status(), "env_queue_size": own, "env_weight": reg.weight,
                # Atropos BaseEnv reads these three; units are its (groups of this env).
                "self_queue_size": own // reg.group_size,
                "max_group_size": max(e.group_size for e in self.envs.values()),
                "unallocated_fraction": max(0.0, 1.0 - allocated)}
