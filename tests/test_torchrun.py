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


def test_a_mode_not_wired_is_refused_in_one_line():
    mode = "tests/reliability_mode.py:train"  # declares no DATA_PARALLEL
    with pytest.raises(ConfigError) as err:
        check_distributed_support(TrainConfig(mode=mode), 2)
    message = str(err.value)
    assert "\n" not in message and f"--mode {mode} does not run on 2 ranks" in message
    assert "--mode legacy, full_nccl" in message and "one process" in message
    check_distributed_support(TrainConfig(mode=mode), 1)  # one process: as today


@pytest.mark.parametrize("mode", ["lora_nccl", "full_nccl"])
def test_restarting_vllm_is_refused_where_rank_0_would_rejoin_alone(mode):
    with pytest.raises(ConfigError, match="--restart-vllm-on-failure does not work with"):
        check_distributed_support(TrainConfig(mode=mode, restart_vllm_on_failure=True), 2)


def test_every_mode_but_shared_vllm_runs_sharded(tmp_path):
    for mode in ("legacy", "lora_hotswap", "lora_nccl", "full_nccl"):
        check_distributed_support(TrainConfig(mode=mode), 2)
        assert mode_runs_sharded(copied_mode(mode, tmp_path))  # and copies of them
    assert not mode_runs_sharded("shared_vllm")
    assert not mode_runs_sharded("tests/reliability_mode.py:train")


def test_cli_refuses_before_any_process_group(tiny_model_dir):
    """WORLD_SIZE=2 as torchrun sets it: the refusal comes before a rendezvous is tried."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    out = subprocess.run([sys.executable, "-m", "example_trainer", "--mode", "shared_vllm",
                          "--model", str(tiny_model_dir)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "shared_vllm cannot run on 2 ranks" in out.stderr and "legacy" in out.stderr


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """torchrun's command line; one rank: a plain `python -m example_trainer` (no torchrun)."""
    if nproc == 1:
        return [sys.executable, "-m", "example_trainer", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "example_trainer", *args]


def run_torchrun(args: list[str], log_path, timeout: float = 900, nproc: int = 2
                 ) -> tuple[int, str]:
    """torchrun as a user runs it (its workers sit in sessions of their own; on SIGTERM it
    forwards the signal to them); (exit status, output)."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(torchrun(*args, nproc=nproc), cwd=REPO, start_new_session=True,
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
@pytest.mark.parametrize("mode", ["legacy", "lora_hotswap", "lora_nccl", "full_nccl"])
def test_two_ranks_end_to_end(mode, tiny_model_dir, api_url, tmp_path):
    """2 steps, a sync after each (legacy: 1, each sync is a vLLM restart and its
    single-process test covers several): vLLM serves exactly the sharded trainer's weights
    (the full model or just the adapter, gathered by both ranks, written or sent by rank 0)."""
    from example_trainer.distributed_checkpoint import is_sharded_checkpoint, load_checkpoint
    from transformers import AutoModelForCausalLM
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    lora = ["--lr", "2e-2", "--lora-rank", "8"] if mode.startswith("lora") else []
    try:
        steps = 1 if mode == "legacy" else 2
        args = tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path, steps=steps)
        code, out = run_torchrun(["--mode", copied_mode(mode, tmp_path), *args,
                                  "--sync-every", "1", "--eval-size", "0", *lora],
                                 tmp_path / "torchrun.log", timeout=1200)
        assert code == 0, out[-6000:]
        assert env.wait(timeout=120) == 0, (tmp_path / "env.log").read_text()[-3000:]
    finally:
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    model_class = "PeftModelForCausalLM" if lora else "LlamaForCausalLM"
    assert f"{model_class} over 2 ranks (fp32)" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["step"] for r in report["steps"]] == list(range(1, steps + 1))
    for record in report["steps"]:
        assert record["sync/parity_max_abs"] <= 1e-4, record
        assert record["sync/probe_moved_max_abs"] > 1e-3, record
        assert record["train/sequences"] == 8.0 and record["custom/my_metric"] == 42.0
    assert out.count(f"step {steps}/{steps} |") == 1  # rank 0 alone logs steps
    # The final checkpoint is sharded (DCP, written by both ranks) and loads in one process.
    final = tmp_path / f"step-{steps:06d}"
    assert is_sharded_checkpoint(final)
    if lora:  # the adapter directories vLLM read are gone; the adapter is in the checkpoint
        assert not list(tmp_path.glob("served-*"))
        return
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = load_checkpoint(final, model)
    assert state["step"] == steps and state["world_size"] == 2
    moved = max(float((p.detach() - before[n]).abs().max())
                for n, p in model.named_parameters())
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
    """The weights of a checkpoint (sharded, or one process's), loaded into one process."""
    from example_trainer.distributed_checkpoint import is_sharded_checkpoint, load_checkpoint
    from transformers import AutoModelForCausalLM
    sharded = is_sharded_checkpoint(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(model_dir if sharded else checkpoint,
                                                 dtype=torch.float32)
    if sharded:
        load_checkpoint(checkpoint, model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_resume_at_another_world_size_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """2 steps, then --resume to step 3, at world sizes 2 -> 2, 2 -> 1 and 1 -> 2: the same
    weights as 3 steps in one go on 2 ranks on the same batches (no vLLM:
    tests/torchrun_mode.py). fp32: one process and two ranks agree to rounding."""
    from conftest import start_api_server
    from test_train_loop import make_groups, post_groups
    groups = make_groups(6, vocab=64, seed=3)  # 12 sequences: 3 batches of 4

    def trainer(api: str, save: str, steps: int, *extra: str) -> list[str]:
        return ["--mode", "tests/torchrun_mode.py:train", "--model", str(tiny_model_dir),
                "--api-url", api, "--steps", str(steps), "--batch-size", "4",
                # lr 1e-4: where |g| < AdamW's eps, fp32 rounding that differs between one
                # process and two ranks moves an element by up to ~1% of lr per step (see
                # test_distributed_step); at 1e-3 that reached 3e-5 over 3 steps.
                "--micro-batch-size", "1", "--lr", "1e-4", "--warmup-steps", "1",
                # constant: a schedule's length is --steps, which the two runs set apart
                "--lr-schedule", "constant", "--dtype", "float32", "--save-path", save,
                "--save-every", "1", "--eval-size", "0", "--batch-timeout", "120", *extra]

    def train(name: str, runs: list[tuple[int, int, tuple[str, ...]]]) -> dict:
        """Each run: (ranks, steps, extra flags), one API server for all of them."""
        port = free_port()
        api = start_api_server(port, log_path=tmp_path / f"api-{name}.log")
        url = f"http://127.0.0.1:{port}"
        save = str(tmp_path / name)
        try:
            post_groups(url, groups)
            for i, (ranks, steps, extra) in enumerate(runs):
                code, out = run_torchrun(trainer(url, save, steps, *extra),
                                         tmp_path / f"{name}-{i}.log", 400, nproc=ranks)
                assert code == 0, out[-4000:]
        finally:
            stop_process_group(api)
        return {"out": out, "params": params_of(tmp_path / name / "step-000003",
                                                tiny_model_dir)}

    whole = train("whole", [(2, 3, ())])["params"]
    for first, then in ((2, 2), (2, 1), (1, 2)):
        name = f"resumed-{first}-to-{then}"
        resumed = train(name, [(first, 2, ()), (then, 3, ("--resume", str(tmp_path / name)))])
        kind = "sharded" if first > 1 else "single-process"
        assert f"({kind}, written by {first} rank(s)) at step 2" in resumed["out"], name
        before = params_of(tmp_path / name / "step-000002", tiny_model_dir)
        diff = max(float((resumed["params"][n] - whole[n]).abs().max()) for n in before)
        moved = max(float((whole[n] - before[n]).abs().max()) for n in before)
        assert diff <= (1e-6 if first == then else 1e-5) < moved, (name, diff, moved)


def test_one_process_refuses_a_sharded_checkpoint_it_cannot_resume(tiny_model_dir, tmp_path):
    """Resuming N ranks' checkpoint in one process goes through torch's optimizer state
    dict: with another optimizer it stops at start-up, in one line naming the way out."""
    from example_trainer.distributed_checkpoint import DCP_DIR
    from example_trainer.distributed_checkpoint import check_single_process_resume
    from transformers import AutoModelForCausalLM
    (tmp_path / DCP_DIR).mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    check_single_process_resume(TrainConfig(optimizer="adamw"), model, tmp_path)
    for optimizer, dtype in (("adamw_cpu", torch.float32), ("adamw", torch.bfloat16)):
        with pytest.raises(ConfigError) as err:
            check_single_process_resume(TrainConfig(optimizer=optimizer), model.to(dtype),
                                        tmp_path)
        assert "\n" not in str(err.value) and "--optimizer adamw --dtype float32" in str(err.value)


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers, read from their environment (RANK)."""
    import psutil
    ranks = {}
    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "example_trainer" in " ".join(child.cmdline()):
            ranks[int(rank)] = child.pid
    return ranks


@pytest.mark.slow
def test_a_rank_killed_stops_the_run_naming_it(tiny_model_dir, tmp_path):
    """SIGKILL to rank 1 while rank 0 waits for data: the run fails within --sync-timeout,
    rank 0 says in one line which rank is gone, and no process is left (no vLLM here:
    tests/torchrun_mode.py; vLLM stops on the same exit path as after SIGTERM)."""
    import time
    import psutil
    import requests
    from conftest import start_api_server
    from test_train_loop import make_groups, post_groups
    port = free_port()
    api = start_api_server(port, log_path=tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    trainer = None
    try:
        post_groups(url, make_groups(4, vocab=64, seed=3))  # 2 batches of 4, then no data
        trainer = subprocess.Popen(
            torchrun("--mode", "tests/torchrun_mode.py:train", "--model", str(tiny_model_dir),
                     "--api-url", url, "--steps", "20", "--batch-size", "4",
                     "--micro-batch-size", "2", "--dtype", "float32", "--save-path",
                     str(tmp_path / "run"), "--save-every", "1", "--eval-size", "0",
                     "--batch-timeout", "600", "--sync-timeout", "60"),
            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while requests.get(f"{url}/status", timeout=5).json().get("current_step", 0) < 2:
            assert time.monotonic() < deadline and trainer.poll() is None
            time.sleep(0.5)
        ranks = rank_pids(trainer.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        out, _ = trainer.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        stop_process_group(api)
        if trainer is not None:
            stop_process_group(trainer)
    assert trainer.returncode != 0
    assert took < 60, took  # within --sync-timeout: nothing waits for the dead rank
    named = [line for line in out.splitlines()
             if f"rank 1 (pid {ranks[1]}) of 2 is gone" in line]
    assert len(named) == 1 and "RankLost" in named[0], out[-5000:]
    assert not any(psutil.pid_exists(pid) for pid in ranks.values())


@pytest.mark.slow
def test_two_nodes_on_one_machine(tiny_model_dir, tmp_path):
    """The README's two-node launch (`--nnodes 2`, static rendezvous on node 0's address),
    both nodes on 127.0.0.1, one rank each: they train together and write one sharded
    checkpoint (no vLLM: tests/torchrun_mode.py)."""
    from conftest import start_api_server
    from example_trainer.distributed_checkpoint import is_sharded_checkpoint
    from test_train_loop import make_groups, post_groups
    port, rendezvous = free_port(), free_port()
    api = start_api_server(port, log_path=tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    nodes = []
    try:
        post_groups(url, make_groups(4, vocab=64, seed=3))  # 2 batches of 4
        for node in (0, 1):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                       "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr",
                       "127.0.0.1", "--master-port", str(rendezvous), "-m", "example_trainer",
                       "--mode", "tests/torchrun_mode.py:train", "--model", str(tiny_model_dir),
                       "--api-url", url, "--steps", "2", "--batch-size", "4",
                       "--micro-batch-size", "2", "--dtype", "float32", "--save-path",
                       str(tmp_path / "run"), "--eval-size", "0", "--batch-timeout", "120"]
            nodes.append(subprocess.Popen(command, cwd=REPO, start_new_session=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outputs = [node.communicate(timeout=400)[0] for node in nodes]
    finally:
        stop_process_group(api)
        for node in nodes:
            stop_process_group(node)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "over 2 ranks (fp32)" in outputs[0] and "step 2/2 |" in outputs[0]
    assert "step 2/2 |" not in outputs[1]  # node 1's rank does not log steps
    assert is_sharded_checkpoint(tmp_path / "run" / "step-000002")
