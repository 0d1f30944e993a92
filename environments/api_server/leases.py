"""Leases: batches a trainer holds until its checkpoint covers them (the state machine).

Split from `queue.py` because it is a protocol of its own that Atropos trainers never see.
A trainer opts in with `"leases": true` at /register; a batch handed out is then kept, tied
to a lease id `<queue_id>-<n>`, until the trainer commits it (a checkpoint covers it). `ack`
marks leases up to n trained (they no longer time out) and, on a poll, returns untrained leases
after n (handed out, but the answer never reached the trainer); `commit` deletes them; a
registration's `lease_claim` says which leases the (re-)registering trainer still holds
(`keep`) or has checkpointed (`commit`): every other lease returns to the head of the queue in
its order. An untrained lease not renewed (each /batch poll renews) within `lease_timeout`
seconds returns too. A trainer that does not opt in (Atropos) gets delivery-is-acknowledgement.

`LeaseMixin` is mixed into `TrajectoryQueue`: it shares the queue's index (the deque, head
position, sequence count) and store, since returning a lease is a change to both. Methods named
"inside a transaction" write the store only; their in-memory counterpart runs after the commit.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .packing import Queued
from .store import QueueStore

log = logging.getLogger(__name__)

DEFAULT_LEASE_TIMEOUT_S = 600.0


@dataclass
class Lease:
    """One handed-out batch: its groups' index entries and where it stands."""

    entries: list[Queued]  # in batch order
    step: int
    trained: bool = False
    deadline: float = 0.0  # in memory only: a restarted server gives a full timeout again


class LeaseMixin:
    """The lease operations of `TrajectoryQueue`, over the attributes declared below."""

    store: QueueStore
    queue_id: str
    lease_timeout: float
    queue: deque[Queued]
    queued_sequences: int
    leases: dict[int, Lease]
    _timed_out: set[int]  # leases that expired, to warn if their trainer acknowledges them
    _head_pos: int

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
        self.store.requeue(first, [entry.id for entry in entries], lease_ids)
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
        self.store.delete_leases(done)
        return done

    def _acknowledge(self, ack: str | None, commit: str | None) -> tuple[list[int], list[int]]:
        """Inside a transaction: mark leases up to `ack` trained, delete those up to
        `commit`. Returns (trained, committed) lease numbers for _applied()."""
        trained, committed = [], []
        through = self.parse_lease(ack)
        if through is not None:
            trained = [i for i, held in self.leases.items() if i <= through and not held.trained]
            self.store.mark_trained(trained)
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
        with self.store.transaction():
            self._return_to_head(expired, f"not renewed within {self.lease_timeout:g} s "
                                          "(the trainer holding them stopped polling)")
        self._returned(expired)
        self._timed_out.update(expired)

    def acknowledge(self, ack: str | None, commit: str | None) -> None:
        """POST /batch/ack: a trainer's acknowledgement without taking a batch."""
        with self.store.transaction():
            done = self._acknowledge(ack, commit)
        self._applied(*done)
