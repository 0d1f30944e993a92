"""The trajectory queue: registrations, scored groups, exact-size batches, leases, run state.

`TrajectoryQueue` is everything the API remembers, behind methods that know nothing of HTTP
(the app maps its exceptions to status codes). Batches are served oldest first and hold
exactly the trainer's `batch_size` sequences; groups whose sizes cannot pack exactly are
split, carrying the whole group's score mean/std, so no group waits forever. The queue is
bounded in sequences.

Storage is SQLite (stdlib), one transaction per mutating request, so a post is wholly stored
or wholly refused. With a file (`--queue-db PATH`, WAL journal) a restarted server keeps every
queued group, every registration, the step, the weight version, the finished state and the
leases; `:memory:` (the default) keeps today's behaviour of forgetting on exit. Group bodies
live only in the database; memory holds a small index (id, size, env_id) for packing.

Leases (a trainer opts in with `"leases": true` at /register): a batch handed out is kept,
tied to a lease id `<queue_id>-<n>`, until the trainer commits it (a checkpoint covers it).
`ack` marks leases up to n trained (they no longer time out) and, on a poll, returns untrained
leases after n (handed out, but the answer never reached the trainer); `commit` deletes them; a
registration's `lease_claim` says which leases the (re-)registering trainer still holds
(`keep`) or has checkpointed (`commit`): every other lease returns to the head of the queue in
its order. An untrained lease not renewed (each /batch poll renews) within `lease_timeout`
seconds returns too. A trainer that does not opt in (Atropos) gets today's semantics: delivery
is acknowledgement.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import sqlite3
import statistics
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .schema import (EnvRegistration, GroupError, ScoredData, TrainerRegistration,
                     check_group)

log = logging.getLogger(__name__)

# Fields that hold one entry per sequence; a split slices all of them the same way.
PER_SEQUENCE_FIELDS = ("tokens", "masks", "scores", "advantages", "ref_logprobs",
                       "inference_logprobs", "messages", "overrides", "distill_token_ids",
                       "distill_logprobs")
# After the oldest group has been passed over by this many exact-fit batches, the next batch
# is filled oldest-first (splitting if needed), so an awkwardly sized group cannot starve.
MAX_PASSED_OVER = 2
MEMORY = ":memory:"
DEFAULT_LEASE_TIMEOUT_S = 600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pos INTEGER NOT NULL,              -- queue order (returned leases get smaller ones)
    size INTEGER NOT NULL,
    env_id INTEGER,
    passed_over INTEGER NOT NULL DEFAULT 0,
    lease INTEGER,                     -- NULL: queued; else the lease holding it
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS groups_by_lease ON groups (lease);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    step INTEGER NOT NULL,
    trained INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS envs (env_id INTEGER PRIMARY KEY, registration TEXT NOT NULL);
"""


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
    """Index entry of one stored group; its body stays in the database."""

    id: int
    size: int
    env_id: int | None
    passed_over: int = 0


@dataclass
class _Lease:
    entries: list[_Queued]  # in batch order
    step: int
    trained: bool = False
    deadline: float = 0.0  # in memory only: a restarted server gives a full timeout again


class QueueInUse(sqlite3.OperationalError):
    """Another live server holds this queue database (two would diverge)."""


def _lock_exclusively(db_path: str) -> Any:
    """An flock on `<db>.lock`, held for the process's life (the kernel drops it on any exit,
    SIGKILL included), so two servers never share one queue file."""
    handle = open(f"{db_path}.lock", "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise QueueInUse(f"{db_path} is in use by another API server") from None
    return handle


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class TrajectoryQueue:
    """Everything the API remembers. Methods never await, so on one event loop each is atomic;
    each mutating method is one SQLite transaction, applied to the in-memory index only after
    it commits."""

    def __init__(self, max_queue_sequences: int, db_path: str = MEMORY,
                 lease_timeout: float = DEFAULT_LEASE_TIMEOUT_S) -> None:
        self.max_queue_sequences = max_queue_sequences
        self.lease_timeout = lease_timeout
        self.db_path = db_path
        self.durable = db_path != MEMORY
        if self.durable:
            self._lock = _lock_exclusively(db_path)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per request).
        self.db = sqlite3.connect(db_path, isolation_level=None)
        if self.durable:
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a process crash (SIGKILL) loses no committed transaction;
            # only an OS crash or power loss may lose the last few.
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._load()

    # --- storage ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def _set_meta(self, **values: Any) -> None:
        """Inside a transaction."""
        self.db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            [(key, json.dumps(value)) for key, value in values.items()])

    def _load(self) -> None:
        """Rebuild the in-memory index from the database (empty for a new one)."""
        # New per start and per reset: a trainer that sees it change knows it must register
        # again (example_trainer.api.BatchFetcher), with its lease claim.
        self.instance_id = uuid.uuid4().hex
        if self._meta("queue_id") is None:
            with self._transaction():
                self._set_meta(queue_id=uuid.uuid4().hex[:12], next_env_id=0)
        self.queue_id: str = self._meta("queue_id")
        trainer = self._meta("trainer")
        self.trainer = TrainerRegistration(**trainer) if trainer else None
        self.trainer_uuid: str | None = self._meta("trainer_uuid")
        self.started: bool = self._meta("started", False)
        self.finished: bool = self._meta("finished", False)
        self.finish_reason: str | None = self._meta("finish_reason")
        self.current_step: int = self._meta("current_step", 0)
        self.weight_version: int | None = self._meta("weight_version")
        self.next_env_id: int = self._meta("next_env_id", 0)
        self.envs: dict[int, EnvRegistration] = {
            env_id: EnvRegistration(**json.loads(text))
            for env_id, text in self.db.execute("SELECT env_id, registration FROM envs")}
        self.queue: deque[_Queued] = deque()
        self.leases: dict[int, _Lease] = {}
        self._timed_out: set[int] = set()  # to warn if their trainer acknowledges them later
        rows = self.db.execute("SELECT id, size, env_id, passed_over, lease FROM groups "
                               "ORDER BY pos, id")
        for group_id, size, env_id, passed_over, lease in rows:
            entry = _Queued(group_id, size, env_id, passed_over)
            if lease is None:
                self.queue.append(entry)
            else:
                self.leases.setdefault(lease, _Lease([], 0)).entries.append(entry)
        deadline = time.monotonic() + self.lease_timeout
        for lease_id, step, trained in self.db.execute("SELECT id, step, trained FROM leases"):
            held = self.leases.setdefault(lease_id, _Lease([], step))
            held.step, held.trained, held.deadline = step, bool(trained), deadline
        self.queued_sequences = sum(entry.size for entry in self.queue)
        head, tail = self.db.execute("SELECT min(pos), max(pos) FROM groups").fetchone()
        self._head_pos, self._tail_pos = (head or 0), (tail or 0)
        last = self.db.execute("SELECT data FROM groups ORDER BY id DESC LIMIT 1").fetchone()
        self.latest_example: dict[str, Any] | None = _loads(last[0]) if last else None
        if self.durable:
            log.info("queue database %s: %d groups (%d sequences) queued, %d leases held, "
                     "step %d, %d environments registered%s", self.db_path, len(self.queue),
                     self.queued_sequences, len(self.leases), self.current_step,
                     len(self.envs), ", training finished" if self.finished else "")

    def reset(self) -> None:
        """Forget the queue, leases, environments, trainer registration, step and weight
        version. A file database keeps counting env_ids, so none is ever reused on it."""
        next_env_id = self.next_env_id if self.durable else 0
        with self._transaction() as db:
            for table in ("groups", "leases", "envs", "meta"):
                db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
            self._set_meta(queue_id=uuid.uuid4().hex[:12], next_env_id=next_env_id)
        self._load()

    # --- leases -----------------------------------------------------------------------------

    def lease_name(self, lease_id: int) -> str:
        return f"{self.queue_id}-{lease_id}"

    def parse_lease(self, name: str | None) -> int | None:
        """The number of a lease id of this queue; None for None or another queue's id (a
        server restarted without --queue-db, or reset since)."""
        if not name:
            return None
        queue_id, _, number = str(name).rpartition("-")
        if queue_id != self.queue_id or not number.isdigit():
            log.info("lease %s is not one of this queue's (%s): ignored", name, self.queue_id)
            return None
        return int(number)

    def _return_to_head(self, lease_ids: Iterable[int], why: str) -> None:
        """Inside a transaction: put these leases' groups back at the queue's head, oldest
        lease first, each in its batch order. Call _returned() after the commit."""
        entries = [entry for lease_id in sorted(lease_ids)
                   for entry in self.leases[lease_id].entries]
        if not entries:
            return
        first = self._head_pos - len(entries)
        self.db.executemany("UPDATE groups SET lease = NULL, pos = ? WHERE id = ?",
                            [(first + i, entry.id) for i, entry in enumerate(entries)])
        self.db.executemany("DELETE FROM leases WHERE id = ?",
                            [(lease_id,) for lease_id in lease_ids])
        log.warning("returned %d leased batch(es) (%d sequences) to the head of the queue: %s",
                    len(set(lease_ids)), sum(e.size for e in entries), why)

    def _returned(self, lease_ids: Iterable[int]) -> None:
        entries = [entry for lease_id in sorted(lease_ids)
                   for entry in self.leases.pop(lease_id).entries]
        self.queue.extendleft(reversed(entries))
        self.queued_sequences += sum(entry.size for entry in entries)
        self._head_pos -= len(entries)

    def _commit(self, through: int) -> list[int]:
        """Inside a transaction: delete leases up to `through` (a checkpoint covers them)."""
        done = [lease_id for lease_id in self.leases if lease_id <= through]
        self.db.executemany("DELETE FROM groups WHERE lease = ?", [(i,) for i in done])
        self.db.executemany("DELETE FROM leases WHERE id = ?", [(i,) for i in done])
        return done

    def _acknowledge(self, ack: str | None, commit: str | None) -> tuple[list[int], list[int]]:
        """Inside a transaction: mark leases up to `ack` trained, delete those up to
        `commit`. Returns (trained, committed) lease numbers for _applied()."""
        trained, committed = [], []
        through = self.parse_lease(ack)
        if through is not None:
            trained = [i for i, held in self.leases.items() if i <= through and not held.trained]
            self.db.executemany("UPDATE leases SET trained = 1 WHERE id = ?",
                                [(i,) for i in trained])
            late = sorted(i for i in self._timed_out if i <= through)
            if late:
                log.warning("lease(s) %s acknowledged after they timed out and went back to "
                            "the queue: their groups may be trained twice (raise "
                            "--lease-timeout above the longest training step)",
                            ", ".join(map(self.lease_name, late)))
                self._timed_out.difference_update(late)
        through = self.parse_lease(commit)
        if through is not None:
            committed = self._commit(through)
        return trained, committed

    def _applied(self, trained: list[int], committed: list[int]) -> None:
        for lease_id in trained:
            self.leases[lease_id].trained = True
        for lease_id in committed:
            del self.leases[lease_id]

    def _expired(self) -> list[int]:
        now = time.monotonic()
        return [i for i, held in self.leases.items()
                if not held.trained and held.deadline < now]

    def expire_leases(self) -> None:
        """Return untrained leases nobody renewed within lease_timeout to the queue head."""
        expired = self._expired()
        if not expired:
            return
        with self._transaction():
            self._return_to_head(expired, f"not renewed within {self.lease_timeout:g} s "
                                          "(the trainer holding them stopped polling)")
        self._returned(expired)
        self._timed_out.update(expired)

    def acknowledge(self, ack: str | None, commit: str | None) -> None:
        """POST /batch/ack: a trainer's acknowledgement without taking a batch."""
        with self._transaction():
            done = self._acknowledge(ack, commit)
        self._applied(*done)

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
        with self._transaction():
            committed = self._commit(commit)
            back = [i for i in self.leases if i > max(keep, commit)]
            self._return_to_head(back, "the registering trainer does not hold them (a "
                                       "resumed or new trainer)")
            self._set_meta(trainer=reg.model_dump(), trainer_uuid=trainer_uuid,
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
        with self._transaction() as db:
            db.execute("INSERT INTO envs (env_id, registration) VALUES (?, ?)",
                       (env_id, reg.model_dump_json()))
            self._set_meta(next_env_id=env_id + 1)
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
        with self._transaction() as db:
            db.execute("DELETE FROM envs WHERE env_id = ?", (env_id,))
        del self.envs[env_id]
        log.info("environment %s_%d disconnected", reg.desired_name, env_id)

    def finish(self, reason: str) -> None:
        """The explicit end of training: later posts get TrainingFinished, /batch nothing."""
        with self._transaction():
            self._set_meta(finished=True, finish_reason=reason)
        self.finished, self.finish_reason = True, reason
        log.info("training finished (%s) at step %d; %d sequences left in the queue", reason,
                 self.current_step, self.queued_sequences)

    def set_weight_version(self, version: int) -> None:
        """Environments read it from status() and tag each group they sample with it."""
        with self._transaction():
            self._set_meta(weight_version=version)
        self.weight_version = version
        log.info("trainer serves weight version %d", version)

    # --- data in --------------------------------------------------------------------------------

    def post_groups(self, groups: list[ScoredData], *, as_list: bool) -> None:
        """Queue all groups or none: validate everything, then store them in one transaction.

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
        data = [group.model_dump() for group in groups]
        entries = []
        with self._transaction() as db:
            for pos, (group, body) in enumerate(zip(groups, data), self._tail_pos + 1):
                cursor = db.execute("INSERT INTO groups (pos, size, env_id, data) "
                                    "VALUES (?, ?, ?, ?)",
                                    (pos, len(group.tokens), group.env_id, json.dumps(body)))
                entries.append(_Queued(cursor.lastrowid, len(group.tokens), group.env_id))
        self.queue.extend(entries)
        self._tail_pos += len(entries)
        self.latest_example = data[-1] if data else self.latest_example
        self.queued_sequences += incoming
        log.debug("queued %d groups (%d sequences); queue now %d", len(groups), incoming,
                  self.queued_sequences)

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
                with self._transaction():
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
            with self._transaction():
                self._set_meta(started=True)
            self.started = True
        target = self.trainer.batch_size
        if self.queued_sequences < target:
            return None, None
        chosen = exact_subset([entry.size for entry in self.queue], target)
        starving = self.queue[0].passed_over >= MAX_PASSED_OVER
        split = chosen is None or (starving and chosen[0] != 0)
        taken, passed, cut = (self._plan_split(target) if split else self._plan_exact(chosen))
        bodies = dict(self.db.execute(
            f"SELECT id, data FROM groups WHERE id IN ({','.join('?' * len(taken))})",
            [entry.id for entry in taken]))
        batch = [json.loads(bodies[entry.id]) for entry in taken]
        step = self.current_step + 1
        with self._transaction() as db:
            lease_id = (db.execute("INSERT INTO leases (step) VALUES (?)", (step,)).lastrowid
                        if leasing else None)
            whole = taken[:-1] if cut else taken
            if leasing:
                db.executemany("UPDATE groups SET lease = ? WHERE id = ?",
                               [(lease_id, entry.id) for entry in whole])
            else:
                db.executemany("DELETE FROM groups WHERE id = ?", [(e.id,) for e in whole])
            if cut:
                head, tail = split_group(batch[-1], cut)
                batch[-1] = head
                entry = taken[-1]
                db.execute("UPDATE groups SET size = ?, data = ? WHERE id = ?",
                           (entry.size - cut, json.dumps(tail), entry.id))
                if leasing:
                    head_id = db.execute(
                        "INSERT INTO groups (pos, size, env_id, passed_over, lease, data) "
                        "SELECT pos, ?, env_id, passed_over, ?, ? FROM groups WHERE id = ?",
                        (cut, lease_id, json.dumps(head), entry.id)).lastrowid
            db.executemany("UPDATE groups SET passed_over = passed_over + 1 WHERE id = ?",
                           [(entry.id,) for entry in passed])
            self._set_meta(current_step=step)
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
                leased.append(_Queued(head_id, cut, entry.env_id, entry.passed_over))
        if leasing:
            self.leases[lease_id] = _Lease(leased, step, deadline=time.monotonic()
                                           + self.lease_timeout)
        self.queued_sequences -= target
        self.current_step = step
        log.info("served batch for step %d: %d groups, %d sequences%s%s; %d sequences queued",
                 step, len(batch), target, " (split a group)" if cut else "",
                 f", lease {self.lease_name(lease_id)}" if leasing else "",
                 self.queued_sequences)
        return batch, (self.lease_name(lease_id) if leasing else None)

    def _plan_exact(self, chosen: list[int]) -> tuple[list[_Queued], list[_Queued], int]:
        """(groups to serve, groups passed over, 0): the earliest exact subset."""
        picked, last = set(chosen), chosen[-1]
        taken = [self.queue[i] for i in chosen]
        passed = [entry for i, entry in enumerate(self.queue) if i < last and i not in picked]
        return taken, passed, 0

    def _plan_split(self, target: int) -> tuple[list[_Queued], list[_Queued], int]:
        """Oldest groups whole while they fit, then the first `cut` sequences of the next."""
        taken, remaining = [], target
        for entry in self.queue:
            taken.append(entry)
            if entry.size >= remaining:
                return taken, [], (remaining if entry.size > remaining else 0)
            remaining -= entry.size
        raise AssertionError("queued_sequences >= target, yet the queue ran out")

    # --- status ---------------------------------------------------------------------------------

    def env_sequences(self, env_id: int) -> int:
        return sum(entry.size for entry in self.queue if entry.env_id == env_id)

    def status(self) -> dict[str, Any]:
        self.expire_leases()
        return {"current_step": self.current_step, "queue_size": self.queued_sequences,
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
