"""full_nccl end to end: real API server, real vLLM (CPU) with this project's `example_gloo`
weight-transfer engine (registered through the package's vLLM plugin entry point), real
arithmetic environment. Each sync sends every parameter in packed buckets through vLLM's
weight-transfer API; parity after every sync proves vLLM serves the trainer's weights."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (REPO, copied_mode, free_port, processes_listening_on, run_trainer,
                      start_environment, stop_process_group, tiny_trainer_args)
from test_mode_legacy import check_report

pytestmark = pytest.mark.slow


def test_full_nccl_serves_each_new_policy(tiny_model_dir, api_url, tmp_path):
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    try:
        # A bucket far smaller than the embedding: packed buckets and a tensor sent alone.
        # `--sync-pause none` (requests frozen, then preempted and recomputed) here; the
        # default `wait` runs in the tests below, which sync twice before the fault.
        out = run_trainer("--mode", copied_mode("full_nccl", tmp_path),  # a user's copy
                          *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path),
                          "--sync-bucket-mib", "0.05", "--sync-pause", "none")
        assert out.returncode == 0, out.stdout[-5000:]
        report = check_report(tmp_path, steps=3)  # parity after each of the 3 syncs
        assert all(r["custom/my_metric"] == 42.0 for r in report["steps"])
        for record in report["steps"]:
            assert record["sync/buckets"] > 2, record
            assert record["sync/bytes"] > 1e6, record  # every parameter, not a delta
            assert record["sync/finish_s"] > 0, record
        assert env.wait(timeout=120) == 0, (tmp_path / "env.log").read_text()[-3000:]
    finally:
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    assert (tmp_path / "step-000003" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("served-*"))  # nothing went through the disk


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_full_nccl_fails_clearly_when_vllm_goes_away(fault, tiny_model_dir, api_url,
                                                     tmp_path):
    """vLLM killed (SIGKILL) or hung (SIGSTOP) mid-run: one clear error within
    --sync-timeout (plus the rpc slack), a final checkpoint, no process left."""
    vllm_port, timeout = free_port(), 15
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    log_path = tmp_path / "trainer.log"
    with open(log_path, "wb") as log_file:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "example_trainer", "--mode", "full_nccl",
             *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path, steps=200),
             "--sync-timeout", str(timeout)],
            cwd=REPO, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    pgid = None
    try:
        deadline = time.monotonic() + 600
        while "step 2/200" not in log_path.read_text():
            assert trainer.poll() is None, log_path.read_text()[-5000:]
            assert time.monotonic() < deadline, "trainer did not reach step 2"
            time.sleep(0.5)
        pgid = os.getpgid(processes_listening_on(vllm_port)[0])  # the server's own group
        os.killpg(pgid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        faulted = time.monotonic()
        while " ERROR " not in log_path.read_text():
            assert time.monotonic() - faulted < timeout + 40, (
                "no error within the sync timeout:\n" + log_path.read_text()[-5000:])
            time.sleep(0.5)
        returncode = trainer.wait(timeout=120)
        text = log_path.read_text()
        assert returncode == 1, text[-5000:]
        [error] = [line for line in text.splitlines() if " ERROR example_trainer.cli" in line]
        assert re.search(r"(VLLMGone|WeightSyncError|VLLMError): .*(exited with code|has not "
                         r"answered|did not answer|stopped receiving|failed|cannot reach "
                         r"vLLM)", error), error
        saved = (tmp_path / "latest").read_text().strip()
        assert saved.startswith("step-") and int(saved[5:]) >= 2, saved
        assert (tmp_path / saved / "trainer_state.pt").exists(), text[-3000:]
    finally:
        if pgid is not None and fault == "hung":
            try:
                os.killpg(pgid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop_process_group(trainer)
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
