"""Nothing lost, nothing trained twice: real trainer and API processes killed with SIGKILL.

- The trainer dies by SIGKILL inside a step's optimizer update, two steps after its last
  checkpoint: no final checkpoint, no pending file. `--resume` claims the lease its checkpoint
  covers; the API returns the trained-but-unsaved batch and the one in flight to the head of
  its queue, and the resumed run trains them first. Every posted group ends up trained exactly
  once in the final model (the steps the dead process trained after its checkpoint do not
  count: their parameters died with it).
- The API dies by SIGKILL mid-run and starts again on the same --queue-db: groups still queued
  and the trainer's registration and leases survive, and every group is trained exactly once.

The mode trains without vLLM (the shared loop, no sync) and records the tags of the groups each
step trained.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, free_port, start_api_server, stop_process_group
from test_reliability_restart import kill_group, wait_until
from test_train_loop import make_groups, post_groups

pytestmark = pytest.mark.slow  # real trainer processes and training steps

STEPS, BATCH = 8, 4  # groups of 2 sequences: two groups per batch

TAG_MODE = '''
import json, os, signal, time
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun

TRAINS = "full"

def train(cfg):
    kill_at = int(os.environ.get("KILL_IN_UPDATE", "0"))
    run = TrainingRun.setup(cfg)
    current = {"step": 0}
    def die_mid_update(*_):
        if current["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # inside optimizer.step(): no clean-up at all
    run.optimizer.register_step_pre_hook(die_mid_update)
    with run:
        for step in run.steps():
            current["step"] = step
            batch = run.fetcher.next_batch()
            metrics = grpo_step(run.model, run.optimizer, batch, cfg, run.scheduler)
            run.recorder.log(step, metrics)
            with open(os.environ["CONSUMED"], "a") as fh:
                fh.write(json.dumps([step, [g["tag"] for g in run.fetcher.in_flight]]) + "\\n")
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
            time.sleep(float(os.environ.get("STEP_PAUSE_S", "0")))  # room to act between steps
    return run.results
'''


def records(path: Path) -> list[tuple[int, list[int]]]:
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] \
        if path.exists() else []


def start_trainer(mode: Path, url: str, save: Path, log_path: Path, consumed: Path,
                  *extra: str, **env: str) -> subprocess.Popen:
    with open(log_path, "w") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "example_trainer", "--mode", f"{mode}:train",
             "--model", str(env.pop("MODEL")), "--api-url", url, "--steps", str(STEPS),
             "--batch-size", str(BATCH), "--micro-batch-size", "2", "--lr", "1e-3",
             "--dtype", "float32", "--save-path", str(save), "--save-every", "4",
             "--eval-size", "0", "--batch-timeout", "120", "--api-timeout", "10", *extra],
            cwd=REPO, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "CONSUMED": str(consumed), **env})


def test_trainer_sigkilled_mid_step_then_resumed_trains_every_group_once(tiny_model_dir,
                                                                        tmp_path):
    groups = [dict(g, tag=i) for i, g in enumerate(make_groups(STEPS * BATCH // 2, 500, 5))]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mode, save = tmp_path / "tag_mode.py", tmp_path / "run"
    mode.write_text(textwrap.dedent(TAG_MODE))
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    server = start_api_server(port, "--queue-db", str(tmp_path / "queue.db"),
                              log_path=tmp_path / "api.log")
    procs = []
    try:
        post_groups(url, groups)
        # Checkpoint at step 4; step 5 trained and acknowledged, killed inside step 6.
        proc = start_trainer(mode, url, save, tmp_path / "t1.log", first,
                             MODEL=str(tiny_model_dir), KILL_IN_UPDATE="6")
        procs.append(proc)
        assert proc.wait(timeout=300) == -9, (tmp_path / "t1.log").read_text()[-3000:]
        assert [step for step, _ in records(first)] == [1, 2, 3, 4, 5]
        assert (save / "latest").read_text().strip() == "step-000004"
        assert not list(save.glob("step-*/pending_batches.json"))
        status = requests.get(f"{url}/status", timeout=5).json()
        assert status["current_step"] == 6 and status["queue_size"] == 2 * BATCH

        proc = start_trainer(mode, url, save, tmp_path / "t2.log", second, "--resume",
                             str(save), MODEL=str(tiny_model_dir))
        procs.append(proc)
        assert proc.wait(timeout=300) == 0, (tmp_path / "t2.log").read_text()[-3000:]
        final = requests.get(f"{url}/status", timeout=5).json()
    finally:
        for proc in procs:
            stop_process_group(proc)
        stop_process_group(server)
    resumed = records(second)
    assert [step for step, _ in resumed] == [5, 6, 7, 8]
    # Steps 5 and 6 of the dead process came back, in order, before anything newer.
    assert resumed[0][1] == records(first)[4][1] == [8, 9]
    assert resumed[1][1] == [10, 11]
    kept = [tag for step, tags in records(first) if step <= 4 for tag in tags]
    trained = kept + [tag for _, tags in resumed for tag in tags]
    assert sorted(trained) == list(range(len(groups))), trained  # each exactly once
    assert final["queue_size"] == 0 and final["training_finished"] is True
    # Every lease was committed by the final checkpoint: the database holds nothing.
    with sqlite3.connect(tmp_path / "queue.db") as db:
        assert db.execute("SELECT count(*) FROM groups").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM leases").fetchone()[0] == 0


def test_api_sigkilled_and_restarted_on_its_database_loses_nothing(tiny_model_dir, tmp_path):
    groups = [dict(g, tag=i) for i, g in enumerate(make_groups(STEPS * BATCH // 2, 500, 6))]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = tmp_path / "queue.db"
    mode, save, consumed = tmp_path / "tag_mode.py", tmp_path / "run", tmp_path / "c.jsonl"
    mode.write_text(textwrap.dedent(TAG_MODE))
    server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-1.log")
    trainer = None
    try:
        post_groups(url, groups[:12])  # steps 1-6; the rest after the restart
        # Tiny steps take milliseconds: without a pause between them the trainer could take
        # every queued group before the test sees step 2, and the kill would prove nothing.
        trainer = start_trainer(mode, url, save, tmp_path / "t.log", consumed,
                                MODEL=str(tiny_model_dir), STEP_PAUSE_S="1.5")
        wait_until(lambda: len(records(consumed)) >= 2, "step 2", trainer, tmp_path / "t.log")
        kill_group(server)  # whatever the trainer was doing: training, or inside /batch
        queued = sqlite3.connect(db).execute(
            "SELECT count(*) FROM groups WHERE lease IS NULL").fetchone()[0]
        assert queued > 0, "nothing was queued at the kill: the test would prove nothing"
        time.sleep(1.0)  # the trainer meets a dead API
        server = start_api_server(port, "--queue-db", str(db), log_path=tmp_path / "api-2.log")
        post_groups(url, groups[12:])
        assert trainer.wait(timeout=300) == 0, (tmp_path / "t.log").read_text()[-3000:]
        final = requests.get(f"{url}/status", timeout=5).json()
    finally:
        if trainer is not None:
            stop_process_group(trainer)
        stop_process_group(server)
    trained = [tag for _, tags in records(consumed) for tag in tags]
    assert [step for step, _ in records(consumed)] == list(range(1, STEPS + 1))
    assert sorted(trained) == list(range(len(groups))), trained  # none lost, none twice
    assert final["current_step"] == STEPS and final["queue_size"] == 0
    # The restarted server loaded the queue (its trainer registration too: the trainer may
    # carry on without registering again, or register again keeping its leases).
    assert f"queue database {db}: {queued} groups" in (tmp_path / "api-2.log").read_text()
