"""legacy mode end to end: real API server, real vLLM (CPU), real arithmetic environment."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import (copied_mode, free_port, processes_listening_on, run_trainer, start_environment,
                      stop_process_group, tiny_trainer_args)

pytestmark = pytest.mark.slow


def check_report(run_dir, steps: int) -> dict:
    report = json.loads((run_dir / "bench.json").read_text())
    assert [r["step"] for r in report["steps"]] == list(range(1, steps + 1))
    for record in report["steps"]:
        # vLLM serves exactly the trainer's weights after every sync ...
        assert record["sync/parity_max_abs"] <= 1e-4, record
        # ... and they are new weights, not the ones served before the step.
        assert record["sync/probe_moved_max_abs"] > 1e-3, record
        # Every group was tagged with the weight version it was sampled under (published by
        # the trainer at each sync), never one newer than vLLM served when it was trained.
        assert 0 <= record["data/staleness_max"] < record["step"], record
    return report


def test_legacy_restarts_vllm_on_new_weights(tiny_model_dir, api_url, tmp_path):
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    try:
        mode = copied_mode("legacy", tmp_path)  # the template, copied and edited
        # Two steps (each sync is a vLLM restart, ~1 min here): still a sync that follows
        # another, and an evaluation between steps.
        out = run_trainer("--mode", mode, "--eval-every", "1",
                          *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path,
                                             steps=2))
        assert out.returncode == 0, out.stdout[-5000:]
        report = check_report(tmp_path, steps=2)
        assert all(r["sync/vllm_startup_s"] > 0 for r in report["steps"])
        assert all(r["custom/my_metric"] == 42.0 for r in report["steps"])
        assert "eval_before" in report and "eval_after" in report
        # the trainer's whole wall time (start-up included) > the evaluations' share of it
        assert report["wall_s"] > report["eval_s"] > 0, report
        assert "wall time" in out.stdout
        # --eval-every 1: the learning curve has before, step 1 and after (step 2, evaluated
        # once), on a clock that keeps evaluation apart, and is drawn in the run directory
        curve = report["eval_curve"]
        assert [p["step"] for p in curve] == [0, 1, 2], curve
        assert all(a["train_s"] < b["train_s"] for a, b in zip(curve, curve[1:])), curve
        assert (tmp_path / "accuracy.png").stat().st_size > 0
        assert f"run summary ({mode})" in out.stdout and "held-out acc." in out.stdout
        # The environment stops on the API's training-finished signal, not by a count.
        assert env.wait(timeout=120) == 0, (tmp_path / "env.log").read_text()[-3000:]
    finally:
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002"]
    assert not list(tmp_path.glob("served-*")) and not list(tmp_path.glob(".tmp-*"))


def wait_for_vllm(port: int, timeout: float = 300) -> None:
    import time
    import requests
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise AssertionError(f"vLLM on port {port} never became healthy")


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])
def test_interrupt_leaves_no_process_behind(tiny_model_dir, api_url, tmp_path, stop_signal):
    import os
    import signal
    import sys
    from conftest import REPO
    vllm_port = free_port()
    args = tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path, steps=50)
    trainer = subprocess.Popen([sys.executable, "-m", "example_trainer", "--mode", "legacy",
                                *args, "--eval-size", "0"], cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_vllm(vllm_port)  # no environment: the trainer now waits for data
        os.kill(trainer.pid, getattr(signal, stop_signal))
        out, _ = trainer.communicate(timeout=120)
    finally:
        stop_process_group(trainer)
    assert trainer.returncode != 0, out[-3000:]
    assert processes_listening_on(vllm_port) == []
    status = __import__("requests").get(f"{api_url}/status", timeout=5).json()
    assert status["training_finished"] is True  # environments are told to stop


def test_failure_leaves_no_process_behind_and_explains(tiny_model_dir, api_url, tmp_path):
    vllm_port = free_port()
    out = run_trainer("--mode", "legacy",
                      *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path),
                      "--batch-timeout", "3", "--eval-size", "0")
    assert out.returncode == 1
    assert "no batch from" in out.stdout and "is an environment running" in out.stdout
    assert processes_listening_on(vllm_port) == []


def test_unreachable_api_names_the_url_and_the_fix(tiny_model_dir, tmp_path):
    port = free_port()
    out = run_trainer("--mode", "legacy", "--model", str(tiny_model_dir), "--api-url",
                      f"http://127.0.0.1:{port}", "--api-timeout", "1",
                      "--save-path", str(tmp_path), timeout=120)
    assert out.returncode == 1
    assert f"http://127.0.0.1:{port}" in out.stdout
    assert "python -m environments.api_server" in out.stdout
