"""Process control for the mode comparison: one mode's servers and trainer, and vLLM's
counters and memory while it runs.

`run_mode` starts a fresh trajectory API, a fresh arithmetic environment and the trainer
(`python -m example_trainer --mode M ... --benchmark-json`), each in its own process group,
with the same model, seed, batch and step count for every mode; the trainer starts its own
vLLM. While the trainer runs, `VLLMMonitor` polls vLLM's Prometheus counter
`vllm:generation_tokens_total` (generation tokens/s) and the memory of vLLM's process group.
The time the trainer was started (`trainer_spawned_unix`) is the learning view's zero.
Everything is stopped by process group, never by name. Linux only (/proc).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Iterable

import requests

if TYPE_CHECKING:
    from .compare import BenchSettings

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30
GENERATION_COUNTER = "vllm:generation_tokens_total"
STEP_LINE = re.compile(r"step \d+/\d+ \|")


# --------------------------------------------------------------------------------------
# Pure helpers (unit-tested with hand-computed values)
# --------------------------------------------------------------------------------------

def parse_prometheus_counter(text: str, name: str) -> float | None:
    """Sum of every sample of counter `name` (all label sets) in Prometheus text format."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            total += float(line.rsplit(None, 1)[-1])
            seen = True
    return total if seen else None


def counter_increase(samples: Iterable[tuple[Hashable, float | None]]) -> float:
    """Total increase of a counter sampled as (server identity, value) pairs.

    A new identity (legacy restarts vLLM) starts again from zero, so its first value counts
    whole; within one server a drop is a reset and the new value counts whole too. Missing
    values (server not answering) are skipped."""
    total, key, previous = 0.0, object(), 0.0
    for identity, value in samples:
        if value is None:
            continue
        if identity != key:
            key, previous = identity, 0.0
        total += value - previous if value >= previous else value
        previous = value
    return total


def failure_reason(log_text: str, limit: int = 240) -> str:
    """One line for the table: the last line that reports an error, else the last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    if not lines:
        return "no output"
    errors = [line for line in lines if re.search(r"error|exception|traceback", line, re.I)]
    return (errors or lines)[-1][:limit]


# --------------------------------------------------------------------------------------
# Processes: our children, each in its own process group
# --------------------------------------------------------------------------------------

def free_port() -> int:
    from ..vllm.server import free_port as _free
    return _free()


def spawn(cmd: list[str], log_path: Path, *, stream_prefix: str = "") -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group) with output to `log_path`.
    With `stream_prefix`, the per-step lines are also logged here as progress."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if not stream_prefix:
        with open(log_path, "wb") as fh:
            return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                                    stdout=fh, stderr=subprocess.STDOUT)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)

    def pump() -> None:  # a reader thread: a full pipe would freeze the trainer
        with open(log_path, "w") as fh:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if STEP_LINE.search(line):
                    log.info("[%s] %s", stream_prefix, line.split(": ", 1)[-1].rstrip())

    threading.Thread(target=pump, name=f"log-{stream_prefix}", daemon=True).start()
    return proc


def stop_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    for pid, _, group in _processes():
        if group == pgid and not _is_zombie(pid):
            return True
    return False


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _processes() -> Iterable[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every visible process (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        yield int(entry.name), int(fields[1]), int(fields[2])


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        with contextlib.suppress(requests.RequestException):
            requests.get(url, timeout=1)
            return
        time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} within {timeout:.0f} s")


def find_vllm_server(port: int) -> int | None:
    """PID of the vLLM API server on `port`: its command line names vllm and `--port
    <port>`, and it leads its own process group (VLLMServer starts it in a new session)."""
    for pid, _, pgid in _processes():
        if pid != pgid:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"vllm" in c for c in cmd) and any(
                a == b"--port" and b == str(port).encode() for a, b in zip(cmd, cmd[1:])):
            return pid
    return None


def group_memory(pgid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over the processes of group `pgid`. PSS splits pages
    shared between processes (libraries, the shared weights of shared_vllm) among them."""
    rss = pss = 0
    for pid, _, group in _processes():
        if group != pgid:
            continue
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
    return rss, pss


class VLLMMonitor:
    """Polls the vLLM server on `port` (whichever process serves it now: legacy restarts
    it): generation-token counter and the memory of its process group."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        self.port, self.interval = port, interval
        self.owner: int | None = None  # the trainer's pid: only its servers are ours
        self.samples: list[dict[str, Any]] = []
        self.pgids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vllm-monitor-{port}",
                                        daemon=True)

    def start(self) -> "VLLMMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # noqa: BLE001 - a monitor must never end the run
                log.debug("vLLM monitor: %s", exc)
            self._stop.wait(self.interval)

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        pid = find_vllm_server(self.port)
        if pid is None:
            return {"t": now, "pid": None, "gen_tokens": None, "rss": 0, "pss": 0}
        parent = next((pp for p, pp, _ in _processes() if p == pid), None)
        if self.owner is not None and parent == self.owner:
            self.pgids.add(pid)
        rss, pss = group_memory(pid)
        tokens = None
        with contextlib.suppress(requests.RequestException, ValueError):
            response = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2)
            if response.ok:
                tokens = parse_prometheus_counter(response.text, GENERATION_COUNTER)
        return {"t": now, "pid": pid, "gen_tokens": tokens, "rss": rss, "pss": pss}

    def result(self) -> dict[str, Any]:
        """Generated tokens over the time a server existed (legacy's restarts count as
        time without generation), and peak group memory."""
        seen = [s for s in self.samples if s["pid"] is not None]
        answered = [s for s in seen if s["gen_tokens"] is not None]
        tokens = counter_increase((s["pid"], s["gen_tokens"]) for s in seen)
        span = answered[-1]["t"] - answered[0]["t"] if answered else 0.0
        return {"generation_tokens": tokens, "span_s": span,
                "tokens_per_s": tokens / span if span > 0 else None,
                "peak_rss_gib": max((s["rss"] for s in seen), default=0) / GiB or None,
                "peak_pss_gib": max((s["pss"] for s in seen), default=0) / GiB or None,
                "samples": len(self.samples), "servers": len({s["pid"] for s in seen})}


# --------------------------------------------------------------------------------------
# One mode
# --------------------------------------------------------------------------------------

def mode_available(mode: str) -> str:
    """Why `mode` cannot run, or '' when its module is there."""
    if importlib.util.find_spec(f"example_trainer.modes.{mode}") is None:
        return f"module example_trainer.modes.{mode} is absent"
    return ""


def trainer_command(mode: str, s: BenchSettings, api_url: str, vllm_port: int,
                    run_dir: Path) -> list[str]:
    """The same flags for every mode; `s.trainer_args` come last and win.

    With `s.learning` each mode keeps its own learning rate, sync interval and LoRA shape
    (its mode file's defaults: the comparison is of each mode at its best) and evaluates
    every `s.eval_every` steps; otherwise no evaluation and the same LoRA rank for all."""
    if s.learning:
        own = ["--eval-size", str(s.eval_size), "--eval-every", str(s.eval_every),
               "--eval-max-tokens", str(s.max_tokens)]  # answers as long as training's
    else:
        own = ["--lora-rank", str(s.lora_rank), "--eval-size", "0"]
    return [sys.executable, "-m", "example_trainer", "--mode", mode, "--model", s.model,
            "--api-url", api_url, "--vllm-port", str(vllm_port), "--steps", str(s.steps),
            "--seed", str(s.seed), "--batch-size", str(s.batch_size),
            "--micro-batch-size", str(s.micro_batch_size), *own,
            "--save-path", str(run_dir), "--benchmark",
            "--benchmark-json", str(run_dir / "trainer.json"), *s.trainer_args]


def run_mode(mode: str, s: BenchSettings, model_path: str, out: Path) -> dict[str, Any]:
    """Fresh API, environment and trainer (which starts vLLM) for one mode; returns the
    trainer's JSON (`steps`, `summary`, ...) plus `vllm` (the monitor) and `status`."""
    run_dir = out / mode
    why = mode_available(mode)
    if why:
        return {"status": "unavailable", "reason": why}
    api_port = free_port()
    vllm_port = free_port()
    while vllm_port == api_port:
        vllm_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    procs: list[subprocess.Popen] = []
    monitor = VLLMMonitor(vllm_port, s.poll_interval)
    started = time.monotonic()
    status, reason, rc = "ok", "", None
    spawned_unix: float | None = None
    try:
        procs.append(spawn([sys.executable, "-m", "environments.api_server", "--host",
                            "127.0.0.1", "--port", str(api_port)], run_dir / "api.log"))
        wait_http(f"{api_url}/status", 30, procs[-1])
        procs.append(spawn([sys.executable, "-m", "environments.arithmetic", "--api-url",
                            api_url, "--vllm-url", f"http://127.0.0.1:{vllm_port}",
                            "--tokenizer", model_path, "--model-name", "policy",
                            "--group-size", str(s.group_size), "--max-tokens",
                            str(s.max_tokens), "--partial-credit", str(s.partial_credit),
                            "--seed", str(s.seed), "--concurrency", "2"],
                           run_dir / "environment.log"))
        monitor.start()
        spawned_unix = time.time()  # the learning view's clock starts here
        trainer = spawn(trainer_command(mode, s, api_url, vllm_port, run_dir),
                        run_dir / "trainer.log", stream_prefix=mode)
        monitor.owner = trainer.pid
        procs.append(trainer)
        try:
            rc = trainer.wait(timeout=s.mode_timeout)
        except subprocess.TimeoutExpired:
            status, reason = "failed", f"timed out after {s.mode_timeout:.0f} s"
    except Exception as exc:  # noqa: BLE001 - one mode's failure is a row, not the end
        status, reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        for proc in reversed(procs):  # trainer first: it stops vLLM itself
            stop_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap it
        monitor.stop()
        for pgid in monitor.pgids:  # a vLLM the trainer could not stop (it was killed)
            stop_group(pgid)
    log_text = (run_dir / "trainer.log").read_text(errors="replace") \
        if (run_dir / "trainer.log").exists() else ""
    report: dict[str, Any] = {}
    if status == "ok" and rc != 0:
        status, reason = "failed", f"trainer exit {rc}: {failure_reason(log_text)}"
    if status == "ok":
        try:
            report = json.loads((run_dir / "trainer.json").read_text())
        except (OSError, ValueError) as exc:
            status, reason = "failed", f"no trainer JSON ({exc})"
    report.update(status=status, reason=reason, wall_s=time.monotonic() - started,
                  vllm=monitor.result(), logs=str(run_dir), trainer_spawned_unix=spawned_unix)
    return report
