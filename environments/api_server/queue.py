"""The trajectory queue: registrations, scored groups, exact-size batches, leases, run state.

`TrajectoryQueue` is everything the API remembers, behind methods that know nothing of HTTP
(the app maps its exceptions to status codes). Batches are served oldest first and hold
exactly the trainer's `batch_size` sequences; groups whose sizes cannot pack exactly are
split, carrying the whole group's score mean/std, so no group waits forever. The queue is
bounded in sequences.

Storage is `store.QueueStore` (SQLite), one transaction per mutating request, so a post is
wholly stored or wholly refused. With a file (`--queue-db PATH`) a restarted server keeps every
queued group, every registration, the step, the weight version, the finished state and the
leases; `:memory:` (the default) keeps today's behaviour of forgetting on exit. Group bodies
live only in the database; memory holds a small index (id, size, env_id) for packing. This
module ties the parts together (registrations, run state, limits, status); `store` holds every
SQL statement.

Leases (`leases.py`, a trainer opts in at /register) keep a handed-out batch until the
trainer's checkpoint covers it; a trainer that does not opt in (Atropos) gets
delivery-is-acknowledgement. Packing (`packing.py`) decides what a batch holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3  # noqa: F401 - tests inject faults through queue.sqlite3.connect
import time
import uuid
from collections import deque
from typing import Any

from .leases import DEFAULT_LEASE_TIMEOUT_S, Lease, LeaseMixin
from .packing import (MAX_PASSED_OVER, PER_SEQUENCE_FIELDS, Queued, exact_subset, plan_batch,
                      split_group)
from .schema import (EnvRegistration, GroupError, ScoredData, TrainerRegistration,
                     check_group)
from .store import MEMORY, SCHEMA, QueueInUse, QueueStore

__all__ = ["DEFAULT_LEASE_TIMEOUT_S", "MAX_PASSED_OVER", "MEMORY", "PER_SEQUENCE_FIELDS",
           "POST_KEY_TTL_S", "SCHEMA", "QueueFull", "QueueInUse", "TrainingFinished",
           "TrajectoryQueue", "UnknownEnv", "exact_subset", "split_group"]

log = logging.getLogger(__name__)

# How long a post's Idempotency-Key is remembered: far longer than any client keeps retrying
# one post (environments give up after --api-timeout, 600 s by default).
POST_KEY_TTL_S = 3600.0


class QueueFull(RuntimeError):
    """Accepting the post would exceed max_queue_sequences (HTTP 429, retry later)."""


class TrainingFinished(RuntimeError):
    """Training has ended; more data has nowhere to go (HTTP 409)."""


class UnknownEnv(LookupError):
    """An env_id that was never registered or has disconnected (HTTP 404)."""


class TrajectoryQueue(LeaseMixin):
    """Everything the API remembers. Methods never await, so on one event loop each is atomic;
    each mutating method is one SQLite transaction, applied to the in-memory index only after
    it commits."""

    def __init__(self, max_queue_sequences: int, db_path: str = MEMORY,
                 lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S) -> None:
        self.max_queue_sequences = max_queue_sequences
        self.lease_timeout = lease_timeout
        self.db_path = db_path
        self.store = QueueStore(db_path)
        self.durable = self.store.durable
        self._load()

    # --- state -----------------------------------------------------------------------------

    def _load(self) -> None:
        """Rebuild the in-memory index from the database (empty for a new one)."""
        # New per start and per reset: a trainer that sees it change knows it must register
        # again (example_trainer.api.BatchFetcher), with its lease claim.
        self.instance_id = uuid.uuid4().hex
        if self.store.meta("queue_id") is None:
            with self.store.transaction():
                self.store.set_meta(queue_id=uuid.uuid4().hex[:12], next_env_id=0)
        self.queue_id: str = self.store.meta("queue_id")
        trainer = self.store.meta("trainer")
        self.trainer = TrainerRegistration(**trainer) if trainer else None
        self.trainer_uuid: str | None = self.store.meta("trainer_uuid")
        self.started: bool = self.store.meta("started", False)
        self.finished: bool = self.store.meta("finished", False)
        self.finish_reason: str | None = self.store.meta("finish_reason")
        self.current_step: int = self.store.meta("current_step", 0)
        self.weight_version: int | None = self.store.meta("weight_version")
        self.next_env_id: int = self.store.meta("next_env_id", 0)
        self.envs: dict[int, EnvRegistration] = {
            env_id: EnvRegistration(**fields) for env_id, fields in self.store.env_rows()}
        self.queue: deque[Queued] = deque()
        self.leases: dict[int, Lease] = {}
        self._timed_out: set[int] = set()  # to warn if their trainer acknowledges them later
        for group_id, size, env_id, passed_over, lease in self.store.group_rows():
            entry = Queued(group_id, size, env_id, passed_over)
            if lease is None:
                self.queue.append(entry)
            else:
                self.leases.setdefault(lease, Lease([], 0)).entries.append(entry)
        deadline = time.monotonic() + self.lease_timeout
        for lease_id, step, trained in self.store.lease_rows():
            held = self.leases.setdefault(lease_id, Lease([], step))
            held.step, held.trained, held.deadline = step, bool(trained), deadline
        self.queued_sequences = sum(entry.size for entry in self.queue)
        self._head_pos, self._tail_pos = self.store.pos_range()
        self.latest_example: dict[str, Any] | None = self.store.latest_body()
        if self.durable:
            log.info("queue database %s: %d groups (%d sequences) queued, %d leases held, "
                     "step %d, %d environments registered%s", self.db_path, len(self.queue),
                     self.queued_sequences, len(self.leases), self.current_step,
                     len(self.envs), ", training finished" if self.finished else "")

    def reset(self) -> None:
        """Forget the queue, leases, environments, trainer registration, step and weight
        version. A file database keeps counting env_ids, so none is ever reused on it."""
        next_env_id = self.next_env_id if self.durable else 0
        with self.store.transaction():
            self.store.clear()
            self.store.set_meta(queue_id=uuid.uuid4().hex[:12], next_env_id=next_env_id)
        self._load()

    # --- trainer and environments -------------------------------------------------------------

    def register_trainer(self, reg: TrainerRegistration) -> dict[str, Any]:
        """Take (or replace) the trainer's registration; clears a finished run.

        Leases of an earlier registration that the claim neither keeps nor commits go back
        to the head of the queue (a trainer that does not use leases claims none)."""
        if self.trainer is not None:
            log.info("trainer re-registered: batch_size %d -> %d, max_token_len %d -> %d, "
                     "step %d -> %d", self.trainer.batch_size, reg.batch_size,
                     self.trainer.max_token_len, reg.max_token_len, self.current_step,
                     reg.starting_step)
        claim = (reg.lease_claim or {}) if reg.leases else {}
        keep = self.parse_lease(claim.get("keep")) or 0
        commit = self.parse_lease(claim.get("commit")) or 0
        trainer_uuid = str(uuid.uuid4())
        with self.store.transaction():
            committed = self._commit(commit)
            back = [i for i in self.leases if i > max(keep, commit)]
            self._return_to_head(back, "the registering trainer does not hold them (a "
                                       "resumed or new trainer)")
            self.store.set_meta(trainer=reg.model_dump(), trainer_uuid=trainer_uuid,
                           current_step=reg.starting_step, finished=False, finish_reason=None)
        self._applied([], committed)
        self._returned(back)
        if committed:
            log.info("trainer's checkpoint covers %d leased batch(es): deleted", len(committed))
        now = time.monotonic()
        for held in self.leases.values():  # kept by the trainer: a full timeout from now
            held.deadline = now + self.lease_timeout
        if self.finished:
            log.info("new trainer registration clears the training-finished state")
            self.finished, self.finish_reason = False, None
        self.trainer, self.trainer_uuid = reg, trainer_uuid
        self.current_step = reg.starting_step
        log.info("trainer registered: batch_size=%d max_token_len=%d starting_step=%d "
                 "num_steps=%d leases=%s", reg.batch_size, reg.max_token_len, reg.starting_step,
                 reg.num_steps, reg.leases)
        return {"uuid": trainer_uuid, "queue_id": self.queue_id, "leases": reg.leases}

    def register_env(self, reg: EnvRegistration) -> dict[str, Any]:
        """Give an environment its env_id, once the trainer has started polling."""
        if self.finished:
            return {"status": "finished"}
        if not self.started or self.trainer is None:
            return {"status": "wait for trainer to start"}
        env_id = self.next_env_id
        with self.store.transaction():
            self.store.add_env(env_id, reg.model_dump_json())
            self.store.set_meta(next_env_id=env_id + 1)
        self.next_env_id = env_id + 1
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
        with self.store.transaction():
            self.store.remove_env(env_id)
        del self.envs[env_id]
        log.info("environment %s_%d disconnected", reg.desired_name, env_id)

    def finish(self, reason: str) -> None:
        """The explicit end of training: later posts get TrainingFinished, /batch nothing."""
        with self.store.transaction():
            self.store.set_meta(finished=True, finish_reason=reason)
        self.finished, self.finish_reason = True, reason
        log.info("training finished (%s) at step %d; %d sequences left in the queue", reason,
                 self.current_step, self.queued_sequences)

    def set_weight_version(self, version: int) -> None:
        """Environments read it from status() and tag each group they sample with it."""
        with self.store.transaction():
            self.store.set_meta(weight_version=version)
        self.weight_version = version
        log.info("trainer serves weight version %d", version)

    # --- data in --------------------------------------------------------------------------------

    def post_groups(self, groups: list[ScoredData], *, as_list: bool,
                    key: str | None = None) -> bool:
        """Queue all groups or none: validate everything, then store them in one transaction.
        False, storing nothing: a post of the same groups with this idempotency `key` was
        stored before (a client retrying after a lost answer; keys are kept
        `POST_KEY_TTL_S`); the key with other groups is refused (GroupError).

        `as_list` prefixes error messages with `groups[k]`, as the list endpoint numbers them.
        """
        data = [group.model_dump() for group in groups]
        digest = None
        if key is not None:
            digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
            stored = self.store.post_key_digest(key, since=time.time() - POST_KEY_TTL_S)
            if stored == digest:
                log.info("post with Idempotency-Key %s was stored before; not storing it "
                         "again", key)
                return False
            if stored is not None:
                raise GroupError(f"Idempotency-Key {key!r} was sent before with other groups: "
                                 "a key names one post and its retries; send new data under "
                                 "a new key")
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
        entries = []
        with self.store.transaction():
            for pos, (group, body) in enumerate(zip(groups, data), self._tail_pos + 1):
                group_id = self.store.add_group(pos, len(group.tokens), group.env_id, body)
                entries.append(Queued(group_id, len(group.tokens), group.env_id))
            if digest is not None:  # with its key
                now = time.time()
                self.store.add_post_key(key, digest, now, forget_before=now - POST_KEY_TTL_S)
        self.queue.extend(entries)
        self._tail_pos += len(entries)
        self.latest_example = data[-1] if data else self.latest_example
        self.queued_sequences += incoming
        log.debug("queued %d groups (%d sequences); queue now %d", len(groups), incoming,
                  self.queued_sequences)
        return True

    # --- data out -------------------------------------------------------------------------------

    def take_batch(self, ack: str | None = None, commit: str | None = None
                   ) -> tuple[list[dict[str, Any]] | None, str | None]:
        """(exactly batch_size sequences, oldest first, or None if too few; the lease id).

        A lease trainer's poll first applies its acknowledgement and renews its untrained
        leases; a batch is then leased, not deleted. The first call also opens registration
        to environments (the trainer has started).
        """
        if ack or commit:
            self.acknowledge(ack, commit)
        leasing = self.trainer is not None and self.trainer.leases
        acked = self.parse_lease(ack) if leasing else None
        if acked is not None:
            # The trainer acknowledges the last batch it received; an untrained lease after
            # it never reached the trainer (the answer was lost, e.g. to a restart).
            lost = [i for i, held in self.leases.items() if i > acked and not held.trained]
            if lost:
                with self.store.transaction():
                    self._return_to_head(lost, "handed out, but the trainer never received "
                                               "them (it acknowledged an earlier lease)")
                self._returned(lost)
        if leasing:
            deadline = time.monotonic() + self.lease_timeout
            for held in self.leases.values():
                held.deadline = deadline
        self.expire_leases()
        if self.trainer is None or self.finished:
            return None, None
        if not self.started:
            log.info("trainer started polling for batches; environments may register now")
            with self.store.transaction():
                self.store.set_meta(started=True)
            self.started = True
        target = self.trainer.batch_size
        if self.queued_sequences < target:
            return None, None
        taken, passed, cut = plan_batch(self.queue, target)
        bodies = self.store.bodies([entry.id for entry in taken])
        batch = [bodies[entry.id] for entry in taken]
        step = self.current_step + 1
        with self.store.transaction():
            whole = taken[:-1] if cut else taken
            if leasing:
                lease_id = self.store.add_lease(step, [entry.id for entry in whole])
            else:
                lease_id = None
                self.store.delete_groups(entry.id for entry in whole)
            if cut:
                head, tail = split_group(batch[-1], cut)
                batch[-1] = head
                entry = taken[-1]
                self.store.shrink_group(entry.id, entry.size - cut, tail)
                if leasing:
                    head_id = self.store.copy_group(entry.id, cut, lease_id, head)
            self.store.pass_over(entry.id for entry in passed)
            self.store.set_meta(current_step=step)
        # Committed: apply to the index.
        for entry in passed:
            entry.passed_over += 1
        removed = {entry.id for entry in whole}
        self.queue = deque(entry for entry in self.queue if entry.id not in removed)
        leased = list(whole)
        if cut:
            entry = taken[-1]
            entry.size -= cut
            if leasing:
                leased.append(Queued(head_id, cut, entry.env_id, entry.passed_over))
        if leasing:
            self.leases[lease_id] = Lease(leased, step, deadline=time.monotonic()
                                           + self.lease_timeout)
        self.queued_sequences -= target
        self.current_step = step
        log.info("served batch for step %d: %d groups, %d sequences%s%s; %d sequences queued",
                 step, len(batch), target, " (split a group)" if cut else "",
                 f", lease {self.lease_name(lease_id)}" if leasing else "",
                 self.queued_sequences)
        return batch, (self.lease_name(lease_id) if leasing else None)

    # --- status ---------------------------------------------------------------------------------

    def env_sequences(self, env_id: int) -> int:
        return sum(entry.size for entry in self.queue if entry.env_id == env_id)

    def status(self) -> dict[str, Any]:
        """/status. `queue_size` counts sequences here (Atropos' run-api counts groups), so
        `queued_sequences` and `queued_groups` say both without ambiguity (the trainer's
        first-batch progress line reads them)."""
        self.expire_leases()
        return {"current_step": self.current_step, "queue_size": self.queued_sequences,
                "queued_sequences": self.queued_sequences, "queued_groups": len(self.queue),
                "training_finished": self.finished, "weight_version": self.weight_version,
                "max_queue_sequences": self.max_queue_sequences,
                "instance_id": self.instance_id}

    def env_status(self, env_id: int) -> dict[str, Any]:
        """status() plus this environment's share of the queue (its back-pressure signal).

        `queue_size` here is in groups of this environment's size, as Atropos' run-api
        answers (BaseEnv throttles on it); `queued_sequences` is the sequence count."""
        reg = self.env(env_id)
        own = self.env_sequences(env_id)
        allocated = sum(e.min_batch_allocation or 0.0 for e in self.envs.values())
        return {**self.status(), "queue_size": self.queued_sequences // reg.group_size,
                "queued_sequences": self.queued_sequences, "queued_groups": len(self.queue),
                "env_queue_size": own, "env_weight": reg.weight,
                # Atropos BaseEnv reads these three; units are its (groups of this env).
                "self_queue_size": own // reg.group_size,
                "max_group_size": max(e.group_size for e in self.envs.values()),
                "unallocated_fraction": max(0.0, 1.0 - allocated)}
