"""Interruption and resume with nothing lost, and crashes mid-save, for real.

The interruption test runs `python -m example_trainer` (a mode without vLLM,
tests/reliability_mode.py) against the real API server and stops it three times with real
signals at the three places that matter: inside an optimizer update (the signal must wait for
the update to finish), after a batch was taken from the API but before it was trained (the
batch must be saved and trained first on resume), and while waiting for data. Each time the
run is resumed with --resume; the final parameters, optimizer state and LR schedule must equal
those of an uninterrupted run on the same data with the same seed.

The crash tests SIGKILL a process while it writes a checkpoint (during the write, between the
write and the rename, between the two renames of a re-save, while replacing `latest`): the
previous checkpoint must stay the one find_checkpoint returns, and it must load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, start_api_server, stop_process_group
from test_train_loop import make_groups, post_groups

pytestmark = pytest.mark.slow  # real subprocesses and training steps

STEPS, BATCH = 8, 4  # groups of 2 sequences: two groups per batch
MODE = "tests/reliability_mode.py:train"


def trainer_args(model_dir: Path, api_url: str, save_path: Path, *extra: str) -> list[str]:
    return ["--mode", MODE, "--model", str(model_dir), "--api-url", api_url,
            "--steps", str(STEPS), "--batch-size", str(BATCH), "--micro-batch-size", "2",
            "--lr", "1e-3", "--warmup-steps", "2", "--lr-schedule", "linear",
            "--weight-decay", "0.01", "--dtype", "float32", "--seed", "0",
            "--save-path", str(save_path), "--save-every", "2", "--keep-checkpoints", "10",
            "--eval-size", "0", "--batch-timeout", "120", "--api-timeout", "10", *extra]


def start_trainer(args: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    with open(log_path, "w") as log_file:
        return subprocess.Popen([sys.executable, "-m", "example_trainer", *args], cwd=REPO,
                                start_new_session=True, stdout=log_file,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **env})


def finish(proc: subprocess.Popen, log_path: Path, timeout: float = 240) -> tuple[int, str]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        raise AssertionError(f"trainer hung:\n{log_path.read_text()[-4000:]}")
    return proc.returncode, log_path.read_text()


def wait_for(predicate, what: str, proc: subprocess.Popen, log_path: Path,
             timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before {what}:\n"
                                 f"{log_path.read_text()[-4000:]}")
        time.sleep(0.05)
    stop_process_group(proc)
    raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()[-4000:]}")


def completed_steps(progress: Path) -> list[int]:
    return [int(line) for line in progress.read_text().split()] if progress.exists() else []


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def latest(save_path: Path) -> str:
    return (save_path / "latest").read_text().strip()


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_model_dir, tmp_path):
    groups = make_groups(STEPS * BATCH // 2, vocab=500, seed=7)
    ref_port, port = free_port(), free_port()
    ref_server = start_api_server(ref_port, log_path=tmp_path / "api-ref.log")
    server = start_api_server(port, log_path=tmp_path / "api.log")
    ref_url, url = f"http://127.0.0.1:{ref_port}", f"http://127.0.0.1:{port}"
    run_dir, ref_dir, progress = tmp_path / "run", tmp_path / "ref", tmp_path / "progress"
    procs: list[subprocess.Popen] = []
    try:
        # The uninterrupted reference runs alongside (same seed, same data, same flags).
        post_groups(ref_url, groups)
        ref = start_trainer(trainer_args(tiny_model_dir, ref_url, ref_dir), tmp_path / "ref.log")
        procs.append(ref)
        # The last batch is held back so that stage 3 can be interrupted while waiting.
        post_groups(url, groups[:-2])

        # --- 1: SIGTERM inside step 2's optimizer update: it waits for the update to end.
        log1 = tmp_path / "stage1.log"
        proc = start_trainer(trainer_args(tiny_model_dir, url, run_dir), log1,
                             REL_SIGNAL_IN_UPDATE="2", REL_PROGRESS=str(progress))
        procs.append(proc)
        rc, out = finish(proc, log1)
        assert rc == 128 + signal.SIGTERM, out[-3000:]
        assert "SIGTERM received: finishing the current update first" in out
        assert last_line(out).endswith(f"interrupted by SIGTERM, stopped after step 2 of "
                                       f"{STEPS}: saved {run_dir / 'step-000002'}; child "
                                       "processes stopped, API told; resume with --resume "
                                       f"{run_dir}"), last_line(out)
        assert latest(run_dir) == "step-000002"
        assert not (run_dir / "step-000002" / "pending_batches.json").exists()
        state = torch.load(run_dir / "step-000002" / "trainer_state.pt", weights_only=False)
        assert state["step"] == 2 and state["scheduler"]["last_epoch"] == 2
        status = requests.get(f"{url}/status", timeout=5).json()
        assert status["training_finished"] is True and status["current_step"] == 2

        # --- 2: resume; SIGTERM after step 5's batch left the API, before it was trained.
        log2 = tmp_path / "stage2.log"
        proc = start_trainer(trainer_args(tiny_model_dir, url, run_dir, "--resume",
                                          str(run_dir)), log2,
                             REL_PAUSE_AFTER_FETCH="5", REL_PROGRESS=str(progress))
        procs.append(proc)
        wait_for(lambda: Path(f"{progress}.paused").exists(), "the step-5 batch", proc, log2)
        assert requests.get(f"{url}/status", timeout=5).json()["current_step"] == 5
        os.kill(proc.pid, signal.SIGTERM)
        rc, out = finish(proc, log2)
        assert rc == 128 + signal.SIGTERM, out[-3000:]
        assert "resumed from" in out and "at step 2" in out
        assert "with 1 untrained batch(es) that a resume trains first" in last_line(out)
        assert latest(run_dir) == "step-000004"
        pending = json.loads((run_dir / "step-000004" / "pending_batches.json").read_text())
        assert [[g["tokens"] for g in batch] for batch in pending] == \
            [[g["tokens"] for g in groups[8:10]]]  # step 5's two groups, nothing else
        assert completed_steps(progress) == [1, 3, 4]  # stage 1 stopped inside step 2

        # --- 3: resume (step 5 is trained from the checkpoint, not the API); SIGINT while
        # waiting for step 8's data.
        log3 = tmp_path / "stage3.log"
        proc = start_trainer(trainer_args(tiny_model_dir, url, run_dir, "--resume",
                                          str(run_dir)), log3, REL_PROGRESS=str(progress))
        procs.append(proc)
        wait_for(lambda: 7 in completed_steps(progress), "step 7", proc, log3)
        time.sleep(1.0)  # polling an empty queue now
        os.kill(proc.pid, signal.SIGINT)
        rc, out = finish(proc, log3)
        assert rc == 128 + signal.SIGINT, out[-3000:]
        assert "training a batch an interrupted run took from the API" in out
        assert last_line(out).endswith(f"interrupted by SIGINT, stopped after step 7 of "
                                       f"{STEPS}: saved {run_dir / 'step-000007'}; child "
                                       "processes stopped, API told; resume with --resume "
                                       f"{run_dir}"), last_line(out)
        assert not (run_dir / "step-000007" / "pending_batches.json").exists()
        # The API counts what it serves: registered at step 4, it served batches 6 and 7
        # only; batch 5 came from the checkpoint, and nothing was taken while waiting.
        assert requests.get(f"{url}/status", timeout=5).json()["current_step"] == 6

        # --- 4: resume to the end. The API refuses data while training is stopped; the
        # resumed trainer's registration re-opens it, then the last data arrives.
        assert requests.post(f"{url}/scored_data", json=groups[-2], timeout=5
                             ).status_code == 409
        log4 = tmp_path / "stage4.log"
        proc = start_trainer(trainer_args(tiny_model_dir, url, run_dir, "--resume",
                                          str(run_dir)), log4, REL_PROGRESS=str(progress))
        procs.append(proc)
        wait_for(lambda: not requests.get(f"{url}/status", timeout=5).json()[
            "training_finished"], "the resumed trainer's registration", proc, log4)
        post_groups(url, groups[-2:])
        rc, out = finish(proc, log4)
        assert rc == 0, out[-3000:]
        rc, out = finish(ref, tmp_path / "ref.log")
        assert rc == 0, out[-3000:]
    finally:
        for proc in procs:
            stop_process_group(proc)
        stop_process_group(server)
        stop_process_group(ref_server)

    final, expected = run_dir / "step-000008", ref_dir / "step-000008"
    weights, ref_weights = (load_file(final / "model.safetensors"),
                            load_file(expected / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name, value in ref_weights.items():
        assert not torch.equal(value, initial[name]), f"{name} never trained"
        # Same batches in the same order on the same CPU code path: bit-identical.
        assert torch.equal(weights[name], value), (
            f"{name}: max |diff| {(weights[name] - value).abs().max():.3g}")
    state = torch.load(final / "trainer_state.pt", weights_only=False)
    ref_state = torch.load(expected / "trainer_state.pt", weights_only=False)
    assert state["step"] == ref_state["step"] == STEPS
    assert state["scheduler"] == ref_state["scheduler"]
    for pid, slots in ref_state["optimizer"]["state"].items():
        for key, value in slots.items():
            assert torch.equal(state["optimizer"]["state"][pid][key], value), (pid, key)


# ---------------------------------------------------------------------------------------------
# kill -9 while a checkpoint is being written
# ---------------------------------------------------------------------------------------------

# A child that saves step 1, then dies by SIGKILL at a chosen point of saving step 2 (or of
# re-saving step 1). The "model" writes real safetensors; `slow` stalls halfway through
# writing them, so the parent's kill -9 lands during the write.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from example_trainer import checkpoint

    root, point, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    class Model(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((512, 1024), value))
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            save_file({"weight": self.weight.detach()}, str(Path(path) / "model.safetensors"))
            if point == "slow" and self.weight[0, 0] == 2.0:
                (Path(path) / "half-written.bin").write_bytes(os.urandom(1 << 20))
                marker.write_text("writing")
                time.sleep(60)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    model = Model(1.0)
    optimizer = torch.optim.AdamW(model.parameters())
    model.weight.grad = torch.ones_like(model.weight)
    optimizer.step()
    with torch.no_grad():
        model.weight.fill_(1.0)
    saver = checkpoint.Checkpointer(root, every=1, keep=5)
    saver.save(1, model=model, optimizer=optimizer)
    real_replace = os.replace
    calls = []
    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if point == "before_rename" and len(calls) == 1:
            die()   # step-2 directory fully written and fsynced, not renamed
        if point == "mid_swap" and len(calls) == 2:
            die()   # re-save: old step-1 moved aside, new one not yet in place
        if point == "latest" and str(dst).endswith("latest"):
            die()   # step-2 renamed into place, `latest` still names step 1
        real_replace(src, dst)
    os.replace = replace
    with torch.no_grad():
        model.weight.fill_(2.0)
    saver.save(1 if point == "mid_swap" else 2, model=model, optimizer=optimizer)
    print("save finished without being killed")
""")


@pytest.mark.parametrize("point", ["slow", "before_rename", "mid_swap", "latest"])
def test_kill_9_during_checkpoint_write_keeps_previous(tmp_path, point):
    from example_trainer.checkpoint import Checkpointer, find_checkpoint, load_trainer_state

    root, marker = tmp_path / "run", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), point, str(marker)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        if point == "slow":
            deadline = time.monotonic() + 60
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert marker.exists(), "the child never started writing step 2"
            os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop_process_group(proc)
    assert proc.returncode == -signal.SIGKILL, out
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert leftovers, "the kill should have left a temporary behind (or the test is vacuous)"

    found = find_checkpoint(root)
    if point == "latest":
        # step-2 was complete and renamed; `latest` still names step 1, which is intact.
        assert found.name == "step-000001"
    elif point == "mid_swap":
        assert found.name.startswith(".old-step-000001")  # the set-aside complete copy
    else:
        assert found.name == "step-000001"
    weight = load_file(found / "model.safetensors")["weight"]
    assert torch.equal(weight, torch.full((512, 1024), 1.0)), "not the previous checkpoint"
    state = load_trainer_state(found)
    assert state["step"] == 1 and state["optimizer"]["state"][0]["step"] == 1

    # A later run cleans up what the dead process left, but keeps an only copy.
    Checkpointer(root)
    remaining = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert remaining == ([found.name] if point == "mid_swap" else [])
    assert find_checkpoint(root) == found


def test_last_checkpoint_written_in_background_is_joined_and_its_failure_raised(tmp_path):
    """The last step's save runs in a thread while vLLM evaluates: `wait` makes it whole,
    a failed write is raised there (not lost), and earlier saves stay synchronous (the next
    step changes the weights they read)."""
    from safetensors.torch import save_file

    from example_trainer.checkpoint import Checkpointer, find_checkpoint

    class Model(torch.nn.Linear):
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            save_file({"weight": self.weight.detach()}, str(Path(path) / "model.safetensors"))

    model = Model(64, 64)
    saver = Checkpointer(tmp_path / "run", every=1, last_in_background=True)
    first = saver.maybe_save(1, 2, model=model)
    assert find_checkpoint(tmp_path / "run") == first and saver.last_saved_step == 1
    last = saver.maybe_save(2, 2, model=model)
    saver.wait()
    assert find_checkpoint(tmp_path / "run") == last and last.name == "step-000002"
    assert saver.last_saved_step == 2
    assert torch.equal(load_file(last / "model.safetensors")["weight"], model.weight)

    broken = Checkpointer(tmp_path / "broken", last_in_background=True)
    broken.maybe_save(1, 1, model="not a model")  # returns at once: the thread fails
    with pytest.raises(AttributeError):
        broken.wait()
    assert broken.last_saved_step is None
    broken.wait()  # reported once


def test_failure_after_some_steps_checkpoints_the_last_whole_step(tiny_model_dir, api_url,
                                                                   tmp_path, caplog):
    """Any abnormal exit (here: data stops coming) saves what was trained, in-process."""
    from dataclasses import replace

    from example_trainer.checkpoint import find_checkpoint
    from example_trainer.config import TrainConfig
    from test_train_loop import train

    cfg = TrainConfig(model=str(tiny_model_dir), steps=4, batch_size=BATCH, micro_batch_size=2,
                      lr=1e-3, save_path=str(tmp_path / "run"), save_every=0, batch_timeout=2,
                      api_url=api_url, seed=0).validate()
    post_groups(api_url, make_groups(3 * BATCH // 2, vocab=500, seed=3))  # 3 of 4 steps
    with pytest.raises(TimeoutError), caplog.at_level("INFO"):
        train(cfg)
    found = find_checkpoint(cfg.save_path)
    assert found.name == "step-000003" and not (found / "pending_batches.json").exists()
    state = torch.load(found / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3
    assert (f"stopped after step 3 of 4: saved {found}; child processes stopped, API told; "
            f"resume with --resume {cfg.save_path}") in caplog.text
    # Nothing trained since this resume point: a second failure writes nothing new.
    caplog.clear()
    with pytest.raises(TimeoutError), caplog.at_level("INFO"):
        train(replace(cfg, resume=cfg.save_path))
    assert "no new checkpoint (nothing trained since resuming from" in caplog.text
    assert sorted(p.name for p in Path(cfg.save_path).iterdir()) == ["latest", "step-000003"]
