"""LoRA modes end to end: real API server, real vLLM (CPU) with runtime LoRA, real arithmetic
environment sampling with the adapter's name. lora_hotswap swaps through a new adapter
directory per version; lora_nccl broadcasts over a gloo group into the LoRAReceiver worker
extension's memory, with no adapter directory per step."""

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

# What each mode's sync must record besides its total time.
SYNC_FIGURES = {"lora_hotswap": [], "lora_nccl": ["sync/install_s"]}


@pytest.mark.parametrize("mode, pause", [("lora_hotswap", "wait"), ("lora_nccl", "wait"),
                                         ("lora_nccl", "none")])
def test_lora_mode_serves_each_new_adapter(mode, pause, tiny_model_dir, api_url, tmp_path):
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    try:
        out = run_trainer("--mode", copied_mode(mode, tmp_path),  # run as a user's copy
                          *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path),
                          "--lr", "2e-2", "--lora-rank", "8", "--sync-pause", pause)
        assert out.returncode == 0, out.stdout[-5000:]
        # After every swap vLLM's 'policy' adapter scores the probe as the peft model does,
        # and differently from the adapter it served before the step.
        report = check_report(tmp_path, steps=3)
        assert all(r["custom/my_metric"] == 42.0 for r in report["steps"])
        for record in report["steps"]:
            assert record["sync_s"] > 0
            assert all(record[figure] > 0 for figure in SYNC_FIGURES[mode]), record
        if mode == "lora_hotswap":  # what it wrote for vLLM: the adapter and its config
            adapter = (tmp_path / "step-000003" / "adapter_model.safetensors").stat().st_size
            assert all(adapter <= r["sync/bytes"] < adapter + 200_000 for r in report["steps"])
        if mode == "lora_nccl":
            # The sync at start-up (an rpc) and step 1's install rebuild the adapter in vLLM
            # (its lora_B was zero at start-up, so the slot plan is learned at step 1). Every
            # step's sync is streamed (no rpc) and installed at vLLM's next engine step; a
            # streamed record reports the install before it, so step 3's is step 2's: straight
            # into the active slot. Parity above proves every install exact.
            assert [r["sync/streamed"] for r in report["steps"]] == [1.0, 1.0, 1.0]
            assert [r["sync/slot_copy"] for r in report["steps"]] == [0.0, 0.0, 1.0]
        assert env.wait(timeout=120) == 0, (tmp_path / "env.log").read_text()[-3000:]
    finally:
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    final = tmp_path / "step-000003"
    assert (final / "adapter_config.json").is_file()  # the checkpoint holds the adapter only
    assert not (final / "model.safetensors").exists()
    assert not list(tmp_path.glob("served-*"))


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_lora_nccl_fails_clearly_when_vllm_goes_away(fault, tiny_model_dir, api_url,
                                                     tmp_path):
    vllm_goes_away("lora_nccl", fault, tiny_model_dir, api_url, tmp_path,
                   causes="exited with code|has not answered|did not answer|failed|"
                          "cannot reach vLLM")


def vllm_goes_away(mode: str, fault: str, tiny_model_dir, api_url, tmp_path, *,
                   causes: str) -> None:
    """vLLM killed (SIGKILL) or hung (SIGSTOP) mid-run of `mode`: the trainer ends with one
    clear error naming one of `causes` within --sync-timeout (plus the rpc slack), not a
    hang, with its last step checkpointed, and no process is left."""
    vllm_port, timeout = free_port(), 15
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    log_path = tmp_path / "trainer.log"
    with open(log_path, "wb") as log_file:
        trainer = subprocess.Popen(
            [sys.executable, "-m", "example_trainer", "--mode", mode,
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
        # The failure is noticed (and said) within the timeout, plus the rpc's own slack ...
        while " ERROR " not in log_path.read_text():
            assert time.monotonic() - faulted < timeout + 40, (
                "no error within the sync timeout:\n" + log_path.read_text()[-5000:])
            time.sleep(0.5)
        # ... then tear-down: checkpoint, vLLM's SIGTERM (it waits for open connections)
        # and SIGKILL fallback.
        returncode = trainer.wait(timeout=120)
        text = log_path.read_text()
        assert returncode == 1, text[-5000:]
        # One line names the cause: vLLM exited / stopped answering / the sync failed.
        [error] = [line for line in text.splitlines() if " ERROR example_trainer.cli" in line]
        assert re.search(rf"(VLLMGone|WeightSyncError|VLLMError): .*({causes})", error), error
        # Without --restart-vllm-on-failure the run ends there, its last step checkpointed.
        saved = (tmp_path / "latest").read_text().strip()
        assert saved.startswith("step-") and int(saved[5:]) >= 2, saved
        assert (tmp_path / saved / "trainer_state.pt").exists(), text[-3000:]
        assert f"resume with --resume {tmp_path}" in text, text[-3000:]
    finally:
        if pgid is not None and fault == "hung":
            try:
                os.killpg(pgid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop_process_group(trainer)
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
