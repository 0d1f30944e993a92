"""LoRA modes end to end: real API server, real vLLM (CPU) with runtime LoRA, real arithmetic
environment sampling with the adapter's name. lora_hotswap swaps through a new adapter
directory per version; lora_nccl broadcasts over a gloo group into the LoRAReceiver worker
extension's memory, with no adapter directory per step."""

from __future__ import annotations

import pytest

from conftest import (free_port, processes_listening_on, run_trainer, start_environment,
                      stop_process_group, tiny_trainer_args)
from test_mode_legacy import check_report

pytestmark = pytest.mark.slow

# What each mode's sync must record besides its total time.
SYNC_FIGURES = {"lora_hotswap": [], "lora_nccl": ["sync/install_s"]}


@pytest.mark.parametrize("mode", sorted(SYNC_FIGURES))
def test_lora_mode_serves_each_new_adapter(mode, tiny_model_dir, api_url, tmp_path):
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    try:
        out = run_trainer("--mode", mode,
                          *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path),
                          "--lr", "2e-2", "--lora-rank", "8")
        assert out.returncode == 0, out.stdout[-5000:]
        # After every swap vLLM's 'policy' adapter scores the probe as the peft model does,
        # and differently from the adapter it served before the step.
        report = check_report(tmp_path, steps=3)
        for record in report["steps"]:
            assert record["sync_s"] > 0
            assert all(record[figure] > 0 for figure in SYNC_FIGURES[mode]), record
        assert env.wait(timeout=120) == 0, (tmp_path / "env.log").read_text()[-3000:]
    finally:
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    final = tmp_path / "step-000003"
    assert (final / "adapter_config.json").is_file()  # the checkpoint holds the adapter only
    assert not (final / "model.safetensors").exists()
    assert not list(tmp_path.glob("served-*"))
