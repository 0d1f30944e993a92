"""The durable queue and leased batches of the trajectory API, against real server processes.

A server started with --queue-db is killed with SIGKILL and started again on the same file:
queued groups, registrations, step, weight version and the finished state survive, env_ids are
not reused. Lease trainers get batches that stay leased until committed; a registration's claim
and a lease timeout return the others to the head of the queue, in order. A post cut short by
SIGKILL inside its transaction leaves nothing behind. (Trainer processes: test_reliability_
durable.py.)
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import requests

from conftest import REPO, free_port, start_api_server, stop_process_group
from test_api_server import get, make_group, post, post_raw, register, register_env, tags


def kill_9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lease_register(url: str, batch_size: int, **claim: str | None) -> dict[str, Any]:
    body = {"batch_size": batch_size, "max_token_len": 64, "num_steps": 10, "leases": True,
            "lease_claim": claim}
    return post(url, "/register", body)


def test_restart_on_the_same_file_keeps_queue_registrations_and_state(tmp_path: Path) -> None:
    db, port = tmp_path / "queue.db", free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-1.log")
    try:
        register(url, 4, starting_step=3)
        assert get(url, "/batch") == {"batch": None}
        env_id = register_env(url, name="arith")["env_id"]
        other = register_env(url, name="other")["env_id"]
        post(url, "/disconnect-env", {"env_id": other})
        post(url, "/scored_data_list", [make_group(t, 2, env_id=env_id) for t in range(5)])
        assert tags(get(url, "/batch")["batch"]) == [0, 1]  # Atropos trainer: delivered
        post(url, "/weight_version", {"version": 7})
        before = get(url, "/status")
        assert before["queue_size"] == 6 and before["current_step"] == 4

        kill_9(server)
        server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-2.log")
        after = get(url, "/status")
        assert after.pop("instance_id") != before.pop("instance_id")
        assert after == before
        assert get(url, "/info") == {"batch_size": 4, "max_token_len": 64}
        # The environment's registration survived: no 404, its share of the queue is known.
        assert get(url, "/status-env", params={"env_id": env_id})["env_queue_size"] == 6
        assert requests.get(f"{url}/status-env", params={"env_id": other},
                            timeout=5).status_code == 404
        assert register_env(url, name="third")["env_id"] == 2  # 0 and 1 are never reused
        assert get(url, "/latest_example")["tokens"][0][0] == 4
        assert tags(get(url, "/batch")["batch"]) == [2, 3]  # oldest first, as before
        assert get(url, "/batch") == {"batch": None} and get(url, "/status")["current_step"] == 5
        post(url, "/training_finished", {"reason": "done"})

        kill_9(server)
        server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-3.log")
        assert get(url, "/status")["training_finished"] is True
        assert post_raw(url, "/scored_data", make_group(9, 2)).status_code == 409
        # A reset forgets everything, yet env_ids on a file still never repeat.
        get(url, "/reset_data")
        register(url, 2)
        get(url, "/batch")
        assert register_env(url)["env_id"] == 3
    finally:
        stop_process_group(server)


def test_leases_ack_commit_and_claims_return_batches_in_order(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_api_server(port, log_path=tmp_path / "api.log")  # leases need no file
    try:
        answer = lease_register(url, 2)
        assert answer["leases"] is True and answer["queue_id"]
        post(url, "/scored_data_list", [make_group(t, 2) for t in range(5)])
        first = get(url, "/batch")
        second = get(url, "/batch", params={"ack": first["lease_id"]})
        third = get(url, "/batch", params={"ack": second["lease_id"],
                                           "commit": first["lease_id"]})
        assert [tags(b["batch"]) for b in (first, second, third)] == [[0], [1], [2]]
        assert get(url, "/status")["queue_size"] == 4
        # Items carry every run-api field, null when absent.
        assert all(first["batch"][0][key] is None
                   for key in ("images", "distill_token_ids", "distill_logprobs"))

        # A resumed trainer whose checkpoint covers the first two batches: the second is
        # deleted, the third (handed out, not covered) comes back first, then the queue.
        lease_register(url, 2, commit=second["lease_id"])
        assert get(url, "/status")["queue_size"] == 6
        again = get(url, "/batch")
        assert tags(again["batch"]) == [2] and again["lease_id"] != third["lease_id"]
        # A re-registration that keeps what it holds (an API restart seen by the trainer).
        lease_register(url, 2, keep=again["lease_id"], commit=second["lease_id"])
        lost = get(url, "/batch", params={"ack": again["lease_id"]})
        assert tags(lost["batch"]) == [3]
        # Suppose that answer never reached the trainer: its next poll acknowledges the
        # earlier lease again, so the lost one goes back to the head and is served again.
        resent = get(url, "/batch", params={"ack": again["lease_id"]})
        assert tags(resent["batch"]) == [3] and resent["lease_id"] != lost["lease_id"]
        # A claim naming another queue's lease means nothing here: everything comes back.
        lease_register(url, 2, commit="someotherqueue-99")
        assert [tags(get(url, "/batch")["batch"]) for _ in range(3)] == [[2], [3], [4]]

        # An Atropos trainer (no leases) gets no lease id and today's semantics, and the
        # leases of the trainer before it go back to the queue for it.
        register(url, 2)
        assert get(url, "/status")["queue_size"] == 6
        plain = get(url, "/batch")
        assert "lease_id" not in plain and tags(plain["batch"]) == [2]
        assert [tags(get(url, "/batch")["batch"]) for _ in range(2)] == [[3], [4]]
        assert get(url, "/batch") == {"batch": None}
        assert post(url, "/batch/ack", {"ack": "x-1", "commit": None}) == {"status": "ok"}
    finally:
        stop_process_group(server)


def test_unrenewed_lease_returns_to_the_queue_head(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_api_server(port, "--lease-timeout", "0.5", log_path=tmp_path / "api.log")
    try:
        lease_register(url, 2)
        post(url, "/scored_data_list", [make_group(t, 2) for t in range(3)])
        taken = get(url, "/batch")
        trained = get(url, "/batch", params={"ack": taken["lease_id"]})  # first: trained
        assert tags(trained["batch"]) == [1]
        # The trainer stops polling: its untrained lease (group 1) goes back to the head; the
        # acknowledged one stays with the trainer until a checkpoint commits it.
        wait_until(lambda: get(url, "/status")["queue_size"] == 4, "the lease to time out")
        served = get(url, "/batch")
        assert tags(served["batch"]) == [1] and served["lease_id"] != trained["lease_id"]
        assert "timed out" in (tmp_path / "api.log").read_text() or \
            "not renewed" in (tmp_path / "api.log").read_text()
    finally:
        stop_process_group(server)


# The real server with one fault injected: the k-th group row of a post makes the server write
# a marker and stop inside its transaction, so the test's SIGKILL lands there.
PAUSING_SERVER = textwrap.dedent("""
    import sqlite3, sys, time
    from pathlib import Path
    from environments.api_server import __main__ as main, queue

    marker, pause_at = Path(sys.argv[1]), int(sys.argv[2])

    class Pausing(sqlite3.Connection):
        inserted = 0
        def execute(self, sql, *args):
            result = super().execute(sql, *args)
            if sql.startswith("INSERT INTO groups"):
                Pausing.inserted += 1
                if Pausing.inserted == pause_at:
                    marker.write_text("inside the transaction")
                    time.sleep(600)
            return result

    real_connect = sqlite3.connect
    queue.sqlite3.connect = lambda *a, **k: real_connect(*a, factory=Pausing, **k)
    raise SystemExit(main.main(sys.argv[3:]))
""")


def test_sigkill_inside_a_large_post_stores_none_of_it(tmp_path: Path) -> None:
    db, port, marker = tmp_path / "queue.db", free_port(), tmp_path / "paused"
    url = f"http://127.0.0.1:{port}"
    big = [make_group(100 + t, 4, length=400) for t in range(200)]  # one post, ~3 MB
    with open(tmp_path / "api-1.log", "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-c", PAUSING_SERVER, str(marker), "3", "--port", str(port),
             "--queue-db", str(db), "--max-queue-sequences", "4096"], cwd=REPO,
            start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _answers(url), "the server")
        register(url, 4, max_token_len=512)
        post(url, "/scored_data", make_group(0, 4))  # rows 1 and 2 of the database
        post(url, "/scored_data", make_group(1, 4))
        failed: list[BaseException] = []
        poster = threading.Thread(target=lambda: _post_expecting_failure(url, big, failed))
        poster.start()
        wait_until(marker.exists, "the big post to be inside its transaction")
        kill_9(server)
        poster.join(30)
        assert failed, "the post should have died with the server"
        server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-2.log")
        assert get(url, "/status")["queue_size"] == 8  # the two small groups, nothing else
        assert tags(get(url, "/batch")["batch"]) == [0]
        # The same post to the intact server: all of it is stored, and survives a SIGKILL.
        post(url, "/scored_data_list", big)
        kill_9(server)
        server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-3.log")
        assert get(url, "/status")["queue_size"] == 4 + 800
    finally:
        stop_process_group(server)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM groups").fetchone()[0] == 201


def _answers(url: str) -> bool:
    try:
        requests.get(f"{url}/status", timeout=1)
        return True
    except requests.RequestException:
        return False


def _post_expecting_failure(url: str, body: Any, failed: list[BaseException]) -> None:
    try:
        requests.post(f"{url}/scored_data_list", json=body, timeout=120)
    except requests.RequestException as err:
        failed.append(err)


def test_second_server_on_the_same_file_is_refused(tmp_path: Path) -> None:
    db, port = tmp_path / "queue.db", free_port()
    server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api.log")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "environments.api_server", "--port", str(free_port()),
             "--queue-db", str(db)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "in use by another API server" in result.stderr, result.stderr
    finally:
        stop_process_group(server)
