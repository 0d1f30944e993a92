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
import requests

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
