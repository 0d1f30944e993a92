"""The trainer under torchrun: FSDP2 on two gloo ranks, end to end with the real API, the real
arithmetic environment and a real vLLM (CPU); and what is refused with more than one rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (REPO, copied_mode, free_port, processes_listening_on, start_environment,
                      stop_process_group, tiny_trainer_args)
from example_trainer.config import ConfigError, TrainConfig
from example_trainer.distributed import check_distributed_support, mode_runs_sharded


@pytest.mark.parametrize("mode", ["lora_hotswap", "lora_nccl", "full_nccl"])
def test_modes_not_wired_are_refused_in_one_line(mode):
    with pytest.raises(ConfigError) as err:
        check_distributed_support(TrainConfig(mode=mode), 2)
    message = str(err.value)
    assert "\n" not in message and f"--mode {mode} does not run on 2 ranks" in message
    assert "--mode legacy" in message and "one process" in message
    check_distributed_support(TrainConfig(mode=mode), 1)  # one process: as today


def test_legacy_and_its_copies_run_sharded(tmp_path):
    check_distributed_support(TrainConfig(mode="legacy"), 2)
    assert mode_runs_sharded(copied_mode("legacy", tmp_path))
    assert not mode_runs_sharded("tests/reliability_mode.py:train")


def test_cli_refuses_before_any_process_group(tiny_model_dir):
    """WORLD_SIZE=2 as torchrun sets it: the refusal comes before a rendezvous is tried."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    out = subprocess.run([sys.executable, "-m", "example_trainer", "--mode", "lora_nccl",
                          "--model", str(tiny_model_dir)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "does not run on 2 ranks yet" in out.stderr and "--mode legacy" in out.stderr


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "example_trainer", *args]


def run_torchrun(args: list[str], log_path, timeout: float = 900) -> tuple[int, str]:
    """torchrun as a user runs it (its workers sit in sessions of their own; on SIGTERM it
    forwards the signal to them); (exit status, output)."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(torchrun(*args), cwd=REPO, start_new_session=True,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGTERM)  # the workers stop and stop vLLM
            try:
                proc.wait(timeout=90)
            finally:
                stop_process_group(proc)
            raise AssertionError(f"torchrun timed out after {timeout} s:\n"
                                 f"{log_path.read_text()[-5000:]}")
    return code, log_path.read_text()


def wait_for_file(path, proc, timeout: float = 300) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the trainer exited early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.5)


@pytest.mark.slow
def test_two_ranks_legacy_end_to_end(tiny_model_dir, api_url, tmp_path):
    """2 steps, a sync after each: vLLM serves exactly the sharded trainer's weights."""
    from example_trainer.distributed_checkpoint import is_sharded_checkpoint, load_checkpoint
    from transformers import AutoModelForCausalLM
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    try:
        args = tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path, steps=2)
        code, out = run_torchrun(["--mode", copied_mode("legacy", tmp_path), *args,
                                  "--sync-every", "1", "--eval-size", "0"],
                                 tmp_path / "torchrun.log", timeout=1200)
        assert code == 0, out[-6000:]
        assert env.wait(timeout=120) == 0, (tmp_path / "env.log").read_text()[-3000:]
    finally:
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    assert "LlamaForCausalLM over 2 ranks (fp32)" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["step"] for r in report["steps"]] == [1, 2]
    for record in report["steps"]:
        assert record["sync/parity_max_abs"] <= 1e-4, record
        assert record["sync/probe_moved_max_abs"] > 1e-3, record
        assert record["train/sequences"] == 8.0 and record["custom/my_metric"] == 42.0
    assert out.count("step 2/2 |") == 1  # rank 0 alone logs steps
    # The final checkpoint is sharded (DCP, written by both ranks) and loads in one process.
    final = tmp_path / "step-000002"
    assert is_sharded_checkpoint(final)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = load_checkpoint(final, model)
    assert state["step"] == 2 and state["world_size"] == 2
    moved = max(float((p - before[n]).abs().max()) for n, p in model.named_parameters())
    assert 0 < moved < 1, moved
    assert not list(tmp_path.glob("served-*")) and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_and_checkpoints(tiny_model_dir, api_url,
                                                              tmp_path):
    """SIGTERM to torchrun while rank 0 waits for data (no environment after step 1):
    every rank stops, the final checkpoint is written, vLLM is gone, the API is told."""
    import requests
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    args = tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path, steps=20)
    trainer = subprocess.Popen(
        torchrun("--mode", "legacy", *args, "--sync-every", "20", "--eval-size", "0",
                 "--save-every", "0"),
        cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"})
    try:
        wait_for_file(tmp_path / "served-step-000000", trainer)
        # let a step or two run, then take the data away: rank 0 now waits for a batch
        import time
        deadline = time.monotonic() + 240
        while requests.get(f"{api_url}/status", timeout=5).json().get("current_step", 0) < 2:
            assert time.monotonic() < deadline and trainer.poll() is None
            time.sleep(0.5)
        stop_process_group(env)
        os.kill(trainer.pid, signal.SIGTERM)
        out, _ = trainer.communicate(timeout=120)
    finally:
        stop_process_group(env)
        stop_process_group(trainer)
    assert trainer.returncode != 0, out[-5000:]
    assert out.count("interrupted by SIGTERM") >= 1, out[-5000:]
    assert processes_listening_on(vllm_port) == []
    checkpoints = sorted(p.name for p in tmp_path.glob("step-*"))
    assert len(checkpoints) == 1 and (tmp_path / checkpoints[0] / "dcp" / ".metadata").exists()
    status = requests.get(f"{api_url}/status", timeout=5).json()
    assert status["training_finished"] is True


def params_of(checkpoint, model_dir) -> dict[str, torch.Tensor]:
    """The weights of a sharded checkpoint, loaded into one process."""
    from example_trainer.distributed_checkpoint import load_checkpoint
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_checkpoint(checkpoint, model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_two_ranks_resume_from_a_sharded_checkpoint_equals_an_uninterrupted_run(
        tiny_model_dir, tmp_path):
    """2 steps, then --resume to step 3 on 2 ranks: the same weights as 3 steps in one go
    on the same batches (no vLLM: tests/torchrun_mode.py)."""
    from conftest import start_api_server
    from test_train_loop import make_groups, post_groups
    groups = make_groups(6, vocab=64, seed=3)  # 12 sequences: 3 batches of 4

    def trainer(api: str, save: str, steps: int, *extra: str) -> list[str]:
        return ["--mode", "tests/torchrun_mode.py:train", "--model", str(tiny_model_dir),
                "--api-url", api, "--steps", str(steps), "--batch-size", "4",
                "--micro-batch-size", "1", "--lr", "1e-3", "--warmup-steps", "1",
                # constant: a schedule's length is --steps, which the two runs set apart
                "--lr-schedule", "constant", "--dtype", "float32", "--save-path", save,
                "--save-every", "1", "--eval-size", "0", "--batch-timeout", "120", *extra]

    runs = {}
    for name in ("resumed", "whole"):
        port = free_port()
        api = start_api_server(port, log_path=tmp_path / f"api-{name}.log")
        url = f"http://127.0.0.1:{port}"
        try:
            post_groups(url, groups)
            save = str(tmp_path / name)
            if name == "resumed":
                code, out = run_torchrun(trainer(url, save, 2), tmp_path / "first.log", 400)
                assert code == 0, out[-4000:]
                code, out = run_torchrun(trainer(url, save, 3, "--resume", save),
                                         tmp_path / "second.log", 400)
                assert "(sharded, written by 2 rank(s)) at step 2" in out, out[-4000:]
            else:
                code, out = run_torchrun(trainer(url, save, 3), tmp_path / "whole.log", 400)
            assert code == 0, out[-4000:]
        finally:
            stop_process_group(api)
        runs[name] = params_of(tmp_path / name / "step-000003", tiny_model_dir)
    before = params_of(tmp_path / "resumed" / "step-000002", tiny_model_dir)
    diff = max(float((runs["resumed"][n] - runs["whole"][n]).abs().max()) for n in before)
    moved = max(float((runs["whole"][n] - before[n]).abs().max()) for n in before)
    assert diff <= 1e-6 < moved, (diff, moved)
