"""Shared fixtures: a tiny random model built once per session, real servers on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from example_trainer.tiny_model import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def start_api_server(port: int, *extra: str, log_path: Path | None = None
                     ) -> subprocess.Popen:
    """Run the real trajectory API server as a child in its own process group.

    Its log goes to a file, never an unread pipe (a full pipe would freeze the server).
    """
    import requests  # lazily: the GPU check machine may lack it, and needs no server
    log_path = log_path or Path(tempfile.mkstemp(prefix=f"api-{port}-", suffix=".log")[1])
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "environments.api_server", "--host", "127.0.0.1",
             "--port", str(port), *extra], cwd=REPO, start_new_session=True,
            stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API server exited: {log_path.read_text()[-2000:]}")
        try:
            requests.get(f"http://127.0.0.1:{port}/status", timeout=1)
            return proc
        except requests.RequestException:
            time.sleep(0.1)
    stop_process_group(proc)
    raise RuntimeError(f"API server did not start within 30 s: {log_path.read_text()[-2000:]}")


def stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture()
def api_url() -> str:
    """A fresh real API server per test (start-up is well under a second)."""
    port = free_port()
    proc = start_api_server(port)
    yield f"http://127.0.0.1:{port}"
    stop_process_group(proc)


def start_environment(api_url: str, vllm_port: int, tokenizer_dir: Path, log_path: Path,
                      *extra: str) -> subprocess.Popen:
    """The real arithmetic environment as its own process, sampling from `policy`.

    A random tiny model never answers correctly, so tests give partial credit for any
    number: rewards then vary within groups and GRPO has a signal.
    """
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "environments.arithmetic", "--api-url", api_url,
             "--vllm-url", f"http://127.0.0.1:{vllm_port}", "--model-name", "policy",
             "--tokenizer", str(tokenizer_dir), "--group-size", "4", "--max-tokens", "12",
             "--partial-credit", "0.5", "--log-level", "INFO", *extra],
            cwd=REPO, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)


def run_trainer(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m example_trainer ...` as a user runs it, in its own process group."""
    proc = subprocess.Popen([sys.executable, "-m", "example_trainer", *args], cwd=REPO,
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"trainer timed out after {timeout} s:\n{out[-5000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def processes_listening_on(port: int) -> list[int]:
    """PIDs whose command line names this port (to prove a server is really gone)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in cmd and str(port).encode() in cmd and any(b"vllm" in c for c in cmd):
            pids.append(int(entry.name))
    return pids


def copied_mode(mode: str, directory: Path) -> str:
    """Copy a built-in mode's file out of the package, as a user starting their own trainer
    does, with one edit (a metric of its own); returns its --mode value. Every mode's
    end-to-end test runs the copy, so every mode is proven to work as a template."""
    import importlib
    source = Path(importlib.import_module(f"example_trainer.modes.{mode}").__file__).read_text()
    edited = source.replace("run.recorder.log(step, metrics)",
                            "metrics['custom/my_metric'] = 42.0\n"
                            "            run.recorder.log(step, metrics)")
    assert edited.count("custom/my_metric") == 1, f"{mode}.py has no recorder.log line to edit"
    path = Path(directory) / f"my_{mode}.py"
    path.write_text(edited)
    return f"{path}:train"


def tiny_trainer_args(model_dir: Path, api_url: str, vllm_port: int, run_dir: Path,
                      steps: int = 3) -> list[str]:
    """Flags for a fast, exact (fp32) end-to-end run on the tiny model."""
    return ["--model", str(model_dir), "--api-url", api_url, "--vllm-port", str(vllm_port),
            "--steps", str(steps), "--batch-size", "8", "--micro-batch-size", "4",
            "--lr", "1e-3", "--sync-every", "1", "--max-token-len", "128", "--dtype", "float32",
            "--save-path", str(run_dir), "--benchmark",
            "--benchmark-json", str(run_dir / "bench.json"), "--parity-check",
            "--eval-size", "4", "--eval-max-tokens", "8", "--batch-timeout", "600"]
