"""Queue benchmark: the load test's traffic against the in-memory and the durable queue.

    python -m environments.api_server.bench [--groups 2000] [--clients 4] [--json PATH]

Starts the real server twice (`--queue-db :memory:`, then a SQLite file in a temporary
directory), each time posting `--groups` groups of 2 sequences x 200 tokens from `--clients`
threads (half one group per request, half lists of five; 429s are retried) while one consumer
takes batches of 50: plainly from the in-memory queue, as a lease trainer that commits every
batch from the durable one. Reports groups/s end to end, the durable/in-memory ratio, and the
server's resident memory after all groups were served (and its peak).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

log = logging.getLogger("environments.api_server.bench")

GROUP_SIZE, BATCH, MAX_QUEUE = 2, 50, 256
COMPLETION = list(range(1000, 1198))


def _group(gid: int) -> dict[str, Any]:
    return {"tokens": [[gid + 1, 60000 + i, *COMPLETION] for i in range(GROUP_SIZE)],
            "masks": [[-100, -100, *COMPLETION] for _ in range(GROUP_SIZE)],
            "scores": [float(i) for i in range(GROUP_SIZE)]}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(queue_db: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "environments.api_server", "--port", str(port),
             "--max-queue-sequences", str(MAX_QUEUE), "--queue-db", queue_db,
             "--log-level", "warning"], start_new_session=True, stdout=log_file,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{url}/status", timeout=1)
            return proc, url
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)


def _produce(url: str, client: int, per_client: int, statuses: dict[int, int],
             lock: threading.Lock) -> None:
    session = requests.Session()
    gids = range(client * per_client, (client + 1) * per_client)
    chunk = 1 if client % 2 == 0 else 5
    for start in range(0, per_client, chunk):
        groups = [_group(g) for g in list(gids)[start:start + chunk]]
        path, body = ("/scored_data", groups[0]) if chunk == 1 else ("/scored_data_list", groups)
        while True:
            code = session.post(url + path, json=body, timeout=30).status_code
            with lock:
                statuses[code] = statuses.get(code, 0) + 1
            if code != 429:
                break
            time.sleep(0.02)


def run_one(queue_db: str, groups: int, clients: int, workdir: Path) -> dict[str, Any]:
    """One pass: post `groups` groups and consume them all; figures for the table."""
    leases = queue_db != ":memory:"
    proc, url = _start(queue_db, workdir / f"api-{'file' if leases else 'memory'}.log")
    try:
        session = requests.Session()
        body = {"batch_size": BATCH, "max_token_len": 256, "num_steps": 0, "leases": leases}
        session.post(f"{url}/register", json=body, timeout=10).raise_for_status()
        baseline = _rss(proc.pid)
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        threads = [threading.Thread(target=_produce,
                                    args=(url, c, groups // clients, statuses, lock))
                   for c in range(clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        total, served, lease, peak = (groups // clients) * clients * GROUP_SIZE, 0, None, 0
        while served < total:
            params = {"ack": lease, "commit": lease} if lease else None
            answer = session.get(f"{url}/batch", params=params, timeout=30).json()
            if answer["batch"] is None:
                time.sleep(0.005)
                continue
            served += sum(len(g["tokens"]) for g in answer["batch"])
            lease = answer.get("lease_id")
            peak = max(peak, _rss(proc.pid))
        if lease:
            session.post(f"{url}/batch/ack", json={"ack": lease, "commit": lease}, timeout=10)
        elapsed = time.perf_counter() - start
        for thread in threads:
            thread.join()
        errors = {code: n for code, n in statuses.items() if code not in (200, 429)}
        if errors:
            raise RuntimeError(f"unexpected answers: {errors}")
        return {"queue": "durable (file, leases)" if leases else "in-memory",
                "groups_per_s": groups / elapsed, "seconds": elapsed,
                "refused_429": statuses.get(429, 0), "rss_mib": _rss(proc.pid) / 2**20,
                "peak_rss_mib": max(peak, _rss(proc.pid)) / 2**20,
                "baseline_rss_mib": baseline / 2**20}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m environments.api_server.bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="queue-bench-") as tmp:
        work = Path(tmp)
        rows = [run_one(":memory:", args.groups, args.clients, work),
                run_one(str(work / "queue.db"), args.groups, args.clients, work)]
    ratio = rows[1]["groups_per_s"] / rows[0]["groups_per_s"]
    log.info("%-24s %10s %8s %8s %10s %10s", "queue", "groups/s", "seconds", "429s",
             "RSS MiB", "peak MiB")
    for row in rows:
        log.info("%-24s %10.0f %8.2f %8d %10.1f %10.1f", row["queue"], row["groups_per_s"],
                 row["seconds"], row["refused_429"], row["rss_mib"], row["peak_rss_mib"])
    log.info("durable / in-memory throughput: %.2f (%d groups, %d clients)", ratio,
             args.groups, args.clients)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio, "groups": args.groups,
                                         "clients": args.clients}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
