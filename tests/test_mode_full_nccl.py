"""full_nccl end to end: real API server, real vLLM (CPU) with this project's `example_gloo`
weight-transfer engine (registered through the package's vLLM plugin entry point), real
arithmetic environment. Each sync sends every parameter in packed buckets through vLLM's
weight-transfer API; parity after every sync proves vLLM serves the trainer's weights."""

from __future__ import annotations

import pytest

from conftest import (copied_mode, free_port, processes_listening_on, run_trainer,
                      start_environment, stop_process_group, tiny_trainer_args)
from test_mode_legacy import check_report
from test_mode_lora import vllm_goes_away

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
    vllm_goes_away("full_nccl", fault, tiny_model_dir, api_url, tmp_path,
                   causes="exited with code|has not answered|did not answer|stopped "
                          "receiving|failed|cannot reach vLLM")
