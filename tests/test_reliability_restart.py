"""Restarts of the parts around the trainer, for real (issue #7 items 3 and 4).

- vLLM killed (SIGKILL of its process group) mid-run with --restart-vllm-on-failure: the
  trainer restarts it, resyncs the current adapter (lora_hotswap: registered from disk again;
  lora_nccl: a new weight-sync group), and finishes; --parity-check after every later sync
  proves vLLM serves the trainer's weights again. (Without the flag the run fails with one
  line and a final checkpoint: tests/test_mode_lora.py's goes_away test.)
- The trajectory API killed and started again on the same port: the trainer notices the new
  server (its /status `instance_id`), registers again at its current step and finishes,
  training every posted group exactly once; an environment re-registers too and re-posts a
  group sampled before the restart instead of dropping it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import (REPO, free_port, processes_listening_on, start_api_server,
                      start_environment, stop_process_group, tiny_trainer_args)
from test_environment import FakeTokenizer, fake_group, poll_batch, start_trainer
from test_train_loop import make_groups, post_groups


def wait_until(predicate, what: str, proc: subprocess.Popen | None, log_path: Path | None,
               timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        tail = log_path.read_text()[-5000:] if log_path else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{tail}")
        time.sleep(0.2)


def kill_group(proc_or_pgid: subprocess.Popen | int) -> None:
    """SIGKILL a whole process group, as a crash would end it, and reap the leader."""
    pgid = proc_or_pgid if isinstance(proc_or_pgid, int) else proc_or_pgid.pid
    os.killpg(pgid, signal.SIGKILL)
    if isinstance(proc_or_pgid, subprocess.Popen):
        proc_or_pgid.wait(timeout=30)


# ------------------------------------------------------------------------------------------
# vLLM dies during training
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora_hotswap", "lora_nccl"])
def test_vllm_killed_mid_run_is_restarted_and_resynced(mode, tiny_model_dir, api_url,
                                                       tmp_path):
    steps, vllm_port = 4, free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    log_path = tmp_path / "trainer.log"
    with open(log_path, "wb") as log_file:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "example_trainer", "--mode", mode,
             *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path, steps=steps),
             "--restart-vllm-on-failure", "--sync-timeout", "30"],
            cwd=REPO, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: f"step 1/{steps}" in log_path.read_text(), "step 1", trainer,
                   log_path, timeout=600)
        [first_pid] = processes_listening_on(vllm_port)
        kill_group(os.getpgid(first_pid))  # the server's own group: API, engine, worker
        returncode = trainer.wait(timeout=600)
        text = log_path.read_text()
        assert returncode == 0, text[-5000:]
    finally:
        stop_process_group(trainer)
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    assert "vLLM exited with code -9 during training" in text, text[-5000:]
    assert "restarting vLLM (1 of at most 3, --restart-vllm-on-failure)" in text
    assert "vLLM restarted and serves the current weights again" in text
    assert (tmp_path / "vllm.log").read_text().count("# example_trainer:") == 2  # two starts

    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["vllm_restarts"] == 1
    records = bench["steps"]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert "vllm/restarts" not in records[0]
    [restarted] = [r["step"] for r in records if r.get("vllm/restart_s", 0) > 0]
    assert all(r["vllm/restarts"] == 1 for r in records if r["step"] >= restarted)
    # Parity after every sync that followed the restart (the probe raises past the
    # tolerance, so a present metric is a passed check): the restarted vLLM serves the
    # trainer's current adapter, and it keeps following the updates.
    later = [r for r in records if r["step"] > restarted]
    assert later, f"the restart came too late to see a later sync: step {restarted}"
    for record in later:
        assert record["sync/parity_max_abs"] <= 1e-4, record


# ------------------------------------------------------------------------------------------
# The trajectory API restarts during training
# ------------------------------------------------------------------------------------------

STEPS, BATCH = 6, 4  # groups of 2 sequences: two groups per batch

# A mode without vLLM (the shared loop, no sync) that records the tags of the groups each
# step trained: the proof that none is trained twice and none is lost.
TAG_MODE = '''
import json, os
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun

TRAINS = "full"

def train(cfg):
    run = TrainingRun.setup(cfg)
    with run:
        for step in run.steps():
            batch = run.fetcher.next_batch()
            metrics = grpo_step(run.model, run.optimizer, batch, cfg, run.scheduler)
            run.recorder.log(step, metrics)
            with open(os.environ["CONSUMED"], "a") as fh:
                fh.write(json.dumps([g["tag"] for g in run.fetcher.in_flight]) + "\\n")
    return run.results
'''


def consumed(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_api_restart_trainer_registers_again_and_trains_nothing_twice(tiny_model_dir,
                                                                      tmp_path):
    groups = [dict(g, tag=i) for i, g in enumerate(make_groups(STEPS * BATCH // 2, 500, 3))]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mode_file, record = tmp_path / "tag_mode.py", tmp_path / "consumed.jsonl"
    mode_file.write_text(textwrap.dedent(TAG_MODE))
    log_path = tmp_path / "trainer.log"
    server = start_api_server(port, log_path=tmp_path / "api-1.log")
    first_instance = requests.get(f"{url}/status", timeout=5).json()["instance_id"]
    trainer = None
    try:
        post_groups(url, groups[:6])  # steps 1-3
        with open(log_path, "w") as log_file:
            trainer = subprocess.Popen(
                [sys.executable, "-m", "example_trainer", "--mode", f"{mode_file}:train",
                 "--model", str(tiny_model_dir), "--api-url", url, "--steps", str(STEPS),
                 "--batch-size", str(BATCH), "--micro-batch-size", "2", "--lr", "1e-3",
                 "--dtype", "float32", "--save-path", str(tmp_path / "run"),
                 "--eval-size", "0", "--batch-timeout", "120", "--api-timeout", "10",
                 "--benchmark-json", str(tmp_path / "bench.json")],
                cwd=REPO, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT,
                text=True, env={**os.environ, "CONSUMED": str(record)})
        wait_until(lambda: len(consumed(record)) == 3, "step 3", trainer, log_path)
        time.sleep(1.0)  # the trainer now polls an empty queue for step 4
        kill_group(server)  # a crash: the queue and the registration are gone
        time.sleep(2.0)  # the trainer sees connection errors and keeps retrying
        server = start_api_server(port, log_path=tmp_path / "api-2.log")
        status = lambda: requests.get(f"{url}/status", timeout=5).json()  # noqa: E731
        assert status()["instance_id"] != first_instance
        # It registers again at the step it reached, so the API's count continues.
        wait_until(lambda: status()["current_step"] == 3, "the trainer's new registration",
                   trainer, log_path, timeout=60)
        post_groups(url, groups[6:])  # steps 4-6
        assert trainer.wait(timeout=240) == 0, log_path.read_text()[-5000:]
        final = status()
    finally:
        if trainer is not None:
            stop_process_group(trainer)
        stop_process_group(server)
    text = log_path.read_text()
    assert "restarted (instance" in text and "registered again at step 3" in text, text[-3000:]
    trained = consumed(record)
    assert len(trained) == STEPS
    tags = [tag for step in trained for tag in step]
    assert sorted(tags) == list(range(len(groups))), trained  # each group exactly once
    assert final["current_step"] == STEPS and final["training_finished"] is True
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert "data/api_reregistrations" not in bench["steps"][2]
    assert bench["steps"][3]["data/api_reregistrations"] == 1


def test_environment_registers_again_after_api_restarts(tmp_path):
    """A group sampled before the restart is re-posted under the new env_id (the API
    answers 422 for the old one), and a 404 from /status-env re-registers as well."""
    from environments.arithmetic import ArithmeticEnv
    from environments.base import EnvConfig
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_api_server(port, log_path=tmp_path / "api-1.log")
    try:
        start_trainer(url, batch_size=2)
        env = ArithmeticEnv(EnvConfig(api_url=url, group_size=2, api_timeout=60,
                                      poll_interval=0.05), tokenizer=FakeTokenizer())
        assert env.register() and env.env_id == 0
        group = fake_group(env)  # sampled under env_id 0

        kill_group(server)
        server = start_api_server(port, log_path=tmp_path / "api-2.log")
        start_trainer(url, batch_size=2)
        requests.post(f"{url}/register-env", json={"max_token_length": 256,
                                                    "desired_name": "other",
                                                    "group_size": 2}, timeout=5)
        # The new server gave id 0 to "other"; ours is unknown there.
        requests.post(f"{url}/disconnect-env", json={"env_id": 0}, timeout=5)
        posted: dict = {}
        thread = threading.Thread(target=lambda: posted.update(ok=env.post_group(group)))
        thread.start()
        thread.join(60)
        assert posted.get("ok") is True and env.env_id == 1
        [served] = poll_batch(url)
        assert served["env_id"] == 1 and served["tokens"] == group["tokens"]

        kill_group(server)
        server = start_api_server(port, log_path=tmp_path / "api-3.log")
        start_trainer(url, batch_size=2)
        assert env.wait_for_room() is True  # 404 for env 1 -> registered again
        assert env.env_id == 0
        env.disconnect()
    finally:
        stop_process_group(server)


@pytest.mark.parametrize("flags, why", [
    (["--mode", "lora_hotswap", "--vllm-url", "http://127.0.0.1:9"], "cannot restart"),
    (["--mode", "shared_vllm"], "does not work with shared_vllm")])
def test_restart_flag_refused_where_no_restart_is_possible(flags, why, tiny_model_dir):
    """Refused before anything starts: a server the trainer did not start, or one whose
    memory the trainer's parameters live in, cannot be restarted under a running trainer."""
    from conftest import run_trainer
    result = run_trainer(*flags, "--model", str(tiny_model_dir), "--restart-vllm-on-failure",
                         "--api-url", "http://127.0.0.1:9", timeout=120)
    assert result.returncode == 2, result.stdout[-2000:]
    [line] = [ln for ln in result.stdout.splitlines() if "--restart-vllm-on-failure" in ln]
    assert why in line, line
