"""While the trainer waits for its first batch it says what the API holds of what it needs.

The line's wording is checked on /status answers of both servers (this project's, Atropos'
run-api); then a real API server and the trainer's fetcher show it changing as groups arrive.
"""

from __future__ import annotations

import logging
import threading
import time

import requests

from conftest import free_port, start_api_server, stop_process_group
from example_trainer.api import BatchFetcher, TrajectoryClient, first_batch_progress


def test_progress_line_counts_what_the_api_holds_against_the_batch() -> None:
    ours = {"queue_size": 6, "queued_sequences": 6, "queued_groups": 3}
    assert first_batch_progress(ours, 16, 12.4) == (
        "waiting for the first batch: the API queue holds 3 groups, 6 of the 16 sequences it "
        "needs (12 s so far)")
    assert first_batch_progress({"queued_sequences": 8, "queued_groups": 1}, 16, 0) == (
        "waiting for the first batch: the API queue holds 1 group, 8 of the 16 sequences it "
        "needs (0 s so far)")
    atropos = {"current_step": 0, "queue_size": 2}  # run-api counts groups
    assert first_batch_progress(atropos, 16, 30) == (
        "waiting for the first batch: the API queue holds 2 groups; it needs 16 sequences "
        "(30 s so far)")
    assert first_batch_progress(None, 16, 40) == (
        "waiting for the first batch: the API does not answer /status (40 s so far)")


def group(tag: int) -> dict:
    tokens = [[tag, i, 100 + tag, 200 + i] for i in range(2)]
    return {"tokens": tokens, "masks": [[-100, -100] + seq[2:] for seq in tokens],
            "scores": [0.0, 1.0], "inference_logprobs": [[1.0, 1.0, -0.5, -0.5]] * 2}


def test_fetcher_reports_the_queue_while_waiting_for_its_first_batch(tmp_path) -> None:
    port = free_port()
    proc = start_api_server(port, log_path=tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        fetcher = BatchFetcher(TrajectoryClient(url), batch_size=4, max_token_len=64,
                               num_steps=2, pad_id=0)
        fetcher.progress_every_s = 0.2
        lines: list[str] = []

        def environment() -> None:
            """Posts a group each time the trainer has said what it waits for."""
            deadline = time.monotonic() + 60
            for tag, after in ((0, "holds 0 groups, 0 of the 4"),
                               (1, "holds 1 group, 2 of the 4")):
                while not any(after in line for line in lines):
                    if time.monotonic() > deadline:
                        return
                    time.sleep(0.05)
                requests.post(f"{url}/scored_data", json=group(tag), timeout=5)

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(record.getMessage())

        handler = Collect(level=logging.INFO)
        logger = logging.getLogger("example_trainer.api")
        logger.addHandler(handler)
        old_level = logger.level
        logger.setLevel(logging.INFO)
        poster = threading.Thread(target=environment, daemon=True)
        poster.start()
        try:
            batch = fetcher.next_batch()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
        poster.join(10)
        assert batch.size == 4
        progress = [line for line in lines if line.startswith("waiting for the first batch")]
        assert any("holds 0 groups, 0 of the 4 sequences it needs" in p for p in progress)
        assert any("holds 1 group, 2 of the 4 sequences it needs" in p for p in progress)
        assert all(p.endswith("s so far)") for p in progress), progress
    finally:
        stop_process_group(proc)
