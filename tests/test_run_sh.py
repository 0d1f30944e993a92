"""run.sh sees deaths: the API or the environment exiting ends the whole run within seconds
(and, opt-in, scripts/atropos_compat.sh against the real Atropos).

Slow: each test runs ./run.sh as a user does (its own API, environment, trainer and vLLM on
the tiny model), kills one process once the environment has registered, and checks that the
run ends within the issue's 10 s, names the dead process once, leaves the trainer's final
word (a checkpoint or "nothing trained") and nothing running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, processes_listening_on, stop_process_group


def pids_with(*parts: str) -> list[int]:
    """PIDs whose command line contains every one of `parts` (as substrings of its args)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(any(part in arg for arg in args) for part in parts):
            found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.slow
@pytest.mark.parametrize("victim, module", [("environment", "environments.arithmetic"),
                                            ("API", "environments.api_server")])
def test_a_dead_process_ends_the_run(victim: str, module: str, tiny_model_dir: Path,
                                     tmp_path: Path) -> None:
    api_port, vllm_port = free_port(), free_port()
    run_dir, out_path = tmp_path / "run", tmp_path / "run.sh.out"
    env = {**os.environ, "API_PORT": str(api_port), "VLLM_PORT": str(vllm_port),
           "RUN_DIR": str(run_dir), "SKIP_SETUP": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    trainer_flags = ["--model", str(tiny_model_dir), "--steps", "50", "--batch-size", "8",
                     "--micro-batch-size", "4", "--lr", "1e-3", "--max-token-len", "128",
                     "--dtype", "float32", "--eval-size", "0", "--batch-timeout", "600"]
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(["bash", str(REPO / "run.sh"), *trainer_flags], cwd=REPO,
                                env=env, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        # Registered means the trainer is in its loop, waiting for data (vLLM is up).
        wait_for_text(run_dir / "environment.log", "registered as env", proc, timeout=600)
        targets = pids_with(module, str(api_port))
        assert len(targets) == 1, targets
        os.kill(targets[0], signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        stop_process_group(proc)
        leftovers = {pid: command_line(pid) for pid in pids_with("environments.",
                                                                    str(api_port))}
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    output = out_path.read_text(errors="replace")
    print(f"run ended {elapsed:.1f} s after the kill")
    assert elapsed < 10, f"the run took {elapsed:.1f} s to end:\n{output[-3000:]}"
    assert code != 0, output[-3000:]
    named = re.findall(rf"\[run\.sh\] the {victim} \(pid {targets[0]}\) exited", output)
    assert len(named) == 1, output[-3000:]
    assert re.search(r"nothing trained|saved \S+step-\d+|already saved", output), \
        output[-3000:]
    assert not leftovers, f"still running after run.sh ended: {leftovers}"
    assert processes_listening_on(vllm_port) == []


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ATROPOS_COMPAT"),
                    reason="opt-in (ATROPOS_COMPAT=1): installs atroposlib, about 5 minutes")
def test_atropos_compat_script_passes_both_ways() -> None:
    """scripts/atropos_compat.sh against the real atroposlib 0.4.0 (README, Compatibility)."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "atropos_compat.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FAIL" not in proc.stderr and proc.stderr.count("PASS") == 6, proc.stderr[-4000:]
