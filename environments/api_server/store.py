"""The trajectory queue's SQLite persistence: schema, connection, transactions, row reads/writes.

Split from `queue.py` so the queue logic (packing, the lease state machine, back-pressure,
status) reads as logic, and every SQL statement lives in one place. `QueueStore` knows rows,
not policy: it never decides which groups make a batch or when a lease expires; the queue
calls it inside `transaction()` and applies the result to its in-memory index after commit.

Storage is SQLite (stdlib) so a post is wholly stored or wholly refused. A file database
(`--queue-db PATH`) runs in WAL mode with `synchronous=NORMAL` and is guarded by an flock on
`<db>.lock`, so a second server on the same file is refused rather than diverging; `:memory:`
forgets everything on exit. Group bodies are JSON text and live only here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

MEMORY = ":memory:"

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
CREATE TABLE IF NOT EXISTS post_keys (  -- recent posts' Idempotency-Key: stored once
    key TEXT PRIMARY KEY,
    digest TEXT NOT NULL,              -- of the post's groups: a reused key with other data
    at REAL NOT NULL);                 -- is refused; time.time() when stored
CREATE INDEX IF NOT EXISTS post_keys_by_time ON post_keys (at);
"""


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


def _marks(ids: list[int]) -> str:
    return ",".join("?" * len(ids))


class QueueStore:
    """One SQLite connection and the row-level operations the queue needs. Methods marked
    "inside a transaction" must run within `transaction()`; reads may run anywhere."""

    def __init__(self, db_path: str = MEMORY) -> None:
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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (KeyboardInterrupt too)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- run state (meta) and registrations ---------------------------------------------------

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, **values: Any) -> None:
        """Inside a transaction."""
        self.db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            [(key, json.dumps(value)) for key, value in values.items()])

    def env_rows(self) -> list[tuple[int, dict[str, Any]]]:
        """(env_id, registration fields) of every registered environment."""
        return [(env_id, json.loads(text))
                for env_id, text in self.db.execute("SELECT env_id, registration FROM envs")]

    def add_env(self, env_id: int, registration_json: str) -> None:
        """Inside a transaction."""
        self.db.execute("INSERT INTO envs (env_id, registration) VALUES (?, ?)",
                        (env_id, registration_json))

    def remove_env(self, env_id: int) -> None:
        """Inside a transaction."""
        self.db.execute("DELETE FROM envs WHERE env_id = ?", (env_id,))

    def clear(self) -> None:
        """Inside a transaction: delete every group, lease, environment, meta value and
        remembered post key."""
        for table in ("groups", "leases", "envs", "meta", "post_keys"):
            self.db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names

    # --- idempotency keys of posts --------------------------------------------------------------

    def post_key_digest(self, key: str, since: float) -> str | None:
        """The digest stored with `key` if it was stored at or after `since`."""
        row = self.db.execute("SELECT digest FROM post_keys WHERE key = ? AND at >= ?",
                              (key, since)).fetchone()
        return None if row is None else row[0]

    def add_post_key(self, key: str, digest: str, at: float, forget_before: float) -> None:
        """Inside a transaction: remember `key` (stored with its groups, so both or neither
        survive a crash) and forget keys older than `forget_before`."""
        self.db.execute("DELETE FROM post_keys WHERE at < ?", (forget_before,))
        self.db.execute("INSERT OR REPLACE INTO post_keys (key, digest, at) VALUES (?, ?, ?)",
                        (key, digest, at))

    # --- groups -------------------------------------------------------------------------------

    def group_rows(self) -> list[tuple[int, int, int | None, int, int | None]]:
        """(id, size, env_id, passed_over, lease) of every group, in queue order."""
        return self.db.execute("SELECT id, size, env_id, passed_over, lease FROM groups "
                               "ORDER BY pos, id").fetchall()

    def pos_range(self) -> tuple[int, int]:
        """(smallest, largest) queue position in use; (0, 0) for an empty table."""
        head, tail = self.db.execute("SELECT min(pos), max(pos) FROM groups").fetchone()
        return (head or 0), (tail or 0)

    def latest_body(self) -> dict[str, Any] | None:
        """The body of the most recently stored group (for /latest_example)."""
        last = self.db.execute("SELECT data FROM groups ORDER BY id DESC LIMIT 1").fetchone()
        return _loads(last[0]) if last else None

    def add_group(self, pos: int, size: int, env_id: int | None, body: dict[str, Any]) -> int:
        """Inside a transaction: store one group (one execute per row); returns its id."""
        cursor = self.db.execute("INSERT INTO groups (pos, size, env_id, data) "
                                 "VALUES (?, ?, ?, ?)", (pos, size, env_id, json.dumps(body)))
        return cursor.lastrowid

    def bodies(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """Group bodies by id."""
        rows = self.db.execute(f"SELECT id, data FROM groups WHERE id IN ({_marks(ids)})", ids)
        return {group_id: json.loads(text) for group_id, text in rows}

    def delete_groups(self, ids: Iterable[int]) -> None:
        """Inside a transaction."""
        self.db.executemany("DELETE FROM groups WHERE id = ?", [(i,) for i in ids])

    def shrink_group(self, group_id: int, size: int, body: dict[str, Any]) -> None:
        """Inside a transaction: replace a group by what is left of it after a split."""
        self.db.execute("UPDATE groups SET size = ?, data = ? WHERE id = ?",
                        (size, json.dumps(body), group_id))

    def copy_group(self, source_id: int, size: int, lease_id: int,
                   body: dict[str, Any]) -> int:
        """Inside a transaction: a new row for a split's served part, at the source's
        position, held by `lease_id`; returns its id."""
        return self.db.execute(
            "INSERT INTO groups (pos, size, env_id, passed_over, lease, data) "
            "SELECT pos, ?, env_id, passed_over, ?, ? FROM groups WHERE id = ?",
            (size, lease_id, json.dumps(body), source_id)).lastrowid

    def pass_over(self, ids: Iterable[int]) -> None:
        """Inside a transaction: count one more batch that skipped each of these groups."""
        self.db.executemany("UPDATE groups SET passed_over = passed_over + 1 WHERE id = ?",
                            [(i,) for i in ids])

    # --- leases -------------------------------------------------------------------------------

    def lease_rows(self) -> list[tuple[int, int, int]]:
        """(id, step, trained) of every lease."""
        return self.db.execute("SELECT id, step, trained FROM leases").fetchall()

    def add_lease(self, step: int, group_ids: Iterable[int]) -> int:
        """Inside a transaction: a new lease for `step` holding these groups; returns its id."""
        lease_id = self.db.execute("INSERT INTO leases (step) VALUES (?)", (step,)).lastrowid
        self.db.executemany("UPDATE groups SET lease = ? WHERE id = ?",
                            [(lease_id, group_id) for group_id in group_ids])
        return lease_id

    def requeue(self, first_pos: int, group_ids: list[int], lease_ids: Iterable[int]) -> None:
        """Inside a transaction: release these groups at positions first_pos, first_pos+1, ...
        (in the given order) and drop the leases that held them."""
        self.db.executemany("UPDATE groups SET lease = NULL, pos = ? WHERE id = ?",
                            [(first_pos + i, group_id) for i, group_id in enumerate(group_ids)])
        self.db.executemany("DELETE FROM leases WHERE id = ?",
                            [(lease_id,) for lease_id in lease_ids])

    def mark_trained(self, lease_ids: Iterable[int]) -> None:
        """Inside a transaction."""
        self.db.executemany("UPDATE leases SET trained = 1 WHERE id = ?",
                            [(i,) for i in lease_ids])

    def delete_leases(self, lease_ids: list[int]) -> None:
        """Inside a transaction: delete these leases and the groups they hold."""
        self.db.executemany("DELETE FROM groups WHERE lease = ?", [(i,) for i in lease_ids])
        self.db.executemany("DELETE FROM leases WHERE id = ?", [(i,) for i in lease_ids])
