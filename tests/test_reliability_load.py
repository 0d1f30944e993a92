"""Load: 2,000 groups from 4 concurrent clients while a real BatchFetcher consumes.

Every group carries its id in its first token, so the test can check that each of its
sequences was served exactly once. Clients that get 429 (back-pressure) retry, as
environments do; no request may get a 5xx or fail to connect, the queue never exceeds its
bound, and the server's resident memory stays bounded. It runs against the in-memory queue
with an Atropos-style consumer (delivery is acknowledgement) and against the durable SQLite
queue (--queue-db) with a lease consumer that commits every batch, as a checkpointing trainer
does; then the database must end empty.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import free_port, start_api_server, stop_process_group

CLIENTS, GROUPS_PER_CLIENT, GROUP_SIZE = 4, 500, 2
MAX_QUEUE, BATCH = 256, 50  # 4,000 sequences = 80 batches


COMPLETION = list(range(1000, 1000 + 198))  # large enough that keeping them all would show


def make_group(gid: int) -> dict:
    """Sequence i of group gid starts [gid + 1, 60000 + i]: identifiable; 200 tokens each, so
    4,000 sequences held at once would take ~60 MB, while the bounded queue holds ~4 MB."""
    return {"tokens": [[gid + 1, 60000 + i, *COMPLETION] for i in range(GROUP_SIZE)],
            "masks": [[-100, -100, *COMPLETION] for _ in range(GROUP_SIZE)],
            "scores": [float(i) for i in range(GROUP_SIZE)]}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.parametrize("durable", [False, True], ids=["memory", "queue-db+leases"])
def test_2000_groups_from_4_clients_each_served_exactly_once(tmp_path, durable):
    from example_trainer.api import BatchFetcher, TrajectoryClient

    port = free_port()
    db = tmp_path / "queue.db"
    server = start_api_server(port, "--max-queue-sequences", str(MAX_QUEUE),
                              *(["--queue-db", str(db)] if durable else []),
                              log_path=tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    statuses: Counter = Counter()
    errors: list[str] = []
    refused_once = threading.Event()
    done = threading.Event()
    lock = threading.Lock()
    peak = {"rss": 0, "queue": 0}

    def produce(client: int) -> None:
        session = requests.Session()
        gids = list(range(client * GROUPS_PER_CLIENT, (client + 1) * GROUPS_PER_CLIENT))
        # Clients 0 and 1 post one group per request, 2 and 3 lists of five (all or none).
        chunk = 1 if client < 2 else 5
        for start in range(0, len(gids), chunk):
            groups = [make_group(g) for g in gids[start:start + chunk]]
            path, body = (("/scored_data", groups[0]) if chunk == 1
                          else ("/scored_data_list", groups))
            while True:
                try:
                    response = session.post(url + path, json=body, timeout=30)
                except requests.RequestException as err:
                    with lock:
                        errors.append(f"client {client}: {type(err).__name__}: {err}")
                    return
                with lock:
                    statuses[response.status_code] += 1
                if response.status_code == 200:
                    break
                if response.status_code == 429 and response.headers.get("Retry-After"):
                    refused_once.set()
                    time.sleep(0.02)  # back-pressure: try again shortly
                    continue
                with lock:
                    errors.append(f"client {client}: {response.status_code} {response.text}")
                return

    def monitor() -> None:
        while not done.is_set():
            try:
                queue = requests.get(f"{url}/status", timeout=5).json()["queue_size"]
                peak["queue"] = max(peak["queue"], queue)
                peak["rss"] = max(peak["rss"], rss_bytes(server.pid))
            except (requests.RequestException, OSError) as err:
                errors.append(f"monitor: {err}")
            time.sleep(0.05)

    try:
        fetcher = BatchFetcher(TrajectoryClient(url), batch_size=BATCH, max_token_len=256,
                               num_steps=CLIENTS * GROUPS_PER_CLIENT * GROUP_SIZE // BATCH,
                               pad_id=0, batch_timeout=60, leases=durable)
        baseline = rss_bytes(server.pid)
        threads = [threading.Thread(target=produce, args=(c,)) for c in range(CLIENTS)]
        threads.append(threading.Thread(target=monitor))
        for thread in threads:
            thread.start()
        # Let the queue fill up first, so back-pressure really happens.
        assert refused_once.wait(timeout=60), "the queue never filled: no 429 was seen"

        served: Counter = Counter()
        total = CLIENTS * GROUPS_PER_CLIENT * GROUP_SIZE
        deadline = time.monotonic() + 240
        while sum(served.values()) < total and time.monotonic() < deadline and not errors:
            batch = fetcher.next_batch()
            assert batch.size == BATCH
            served.update(map(tuple, batch.input_ids[:, :2].tolist()))
            fetcher.checkpoint_saved(fetcher.last_lease)  # commit it with the next poll
        fetcher.flush_acknowledgements()
        for thread in threads[:-1]:
            thread.join(timeout=60)
        done.set()
        threads[-1].join(timeout=10)
        status = requests.get(f"{url}/status", timeout=5).json()
        assert requests.get(f"{url}/batch", timeout=5).json() == {"batch": None}
    finally:
        done.set()
        stop_process_group(server)

    assert not errors, errors[:5]
    expected = {(gid + 1, 60000 + i) for gid in range(CLIENTS * GROUPS_PER_CLIENT)
                for i in range(GROUP_SIZE)}
    assert set(served) == expected, f"{len(expected - set(served))} sequences never served"
    assert set(served.values()) == {1}, "a sequence was served twice"
    assert status["queue_size"] == 0 and status["current_step"] == total // BATCH
    assert fetcher.rejected_groups == 0
    assert all(code in (200, 429) for code in statuses), statuses
    assert statuses[429] > 0 and statuses[200] == 2 * GROUPS_PER_CLIENT + 2 * (
        GROUPS_PER_CLIENT // 5)
    assert peak["queue"] <= MAX_QUEUE
    growth = peak["rss"] - baseline
    assert growth < 24 << 20, f"server RSS grew by {growth / 2**20:.0f} MiB"
    if durable:
        assert fetcher.queue_id is not None and fetcher.committed == fetcher.last_lease
        with sqlite3.connect(db) as conn:  # every lease committed, nothing left behind
            assert conn.execute("SELECT count(*) FROM groups").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM leases").fetchone() == (0,)
