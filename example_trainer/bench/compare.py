"""Every mode on the same work in one run: one JSON, one table, one chart (issue #6).

For each selected mode, in turn, `run_mode` starts a fresh trajectory API, a fresh arithmetic
environment and the trainer (`python -m example_trainer --mode M ... --benchmark-json`),
each in its own process group, with the same model, seed, batch and step count; the trainer
starts its own vLLM. While the trainer runs, `VLLMMonitor` polls vLLM's Prometheus counter
`vllm:generation_tokens_total` (generation tokens/s) and the memory of vLLM's process group.

Then `measure_reference` measures, in the same run, what moving each mode's sync bytes costs
at the least: a bare copy into a shared-memory mapping and a bare `torch.distributed`
broadcast (gloo on CPU, NCCL on GPU) of the same bytes from this process to a vLLM worker.
The table shows every mode's sync time as a ratio to both. Optionally (`--optimizers`)
each optimizer's step time and state memory on the same model, as ratios to `adamw`.

Nothing here imitates a part: real servers, real vLLM, the trainer as users run it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

import requests
import torch

from ..config import DEFAULT_MODEL, MODES
from ..recorder import machine_info

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GiB = 2**30

# What each mode keeps in memory (README, modes table); on CPU vLLM also keeps packed GEMM
# copies of its linear weights (DESIGN.md section 5), whatever the mode.
WEIGHT_COPIES = {"legacy": "2 full", "shared_vllm": "1", "lora_hotswap": "base 2 + adapter",
                 "lora_nccl": "base 2 + adapter"}
# Modes that move no bytes between processes, by construction (the metric is then absent).
BYTES_BY_DESIGN = {"shared_vllm": 0}
# Modes whose sync runs inside the train timer (shared_vllm: inside optimizer.step()).
SYNC_INSIDE_TRAIN = {"shared_vllm"}
GENERATION_COUNTER = "vllm:generation_tokens_total"
STEP_LINE = re.compile(r"step \d+/\d+ \|")


@dataclass
class BenchSettings:
    """The work every mode does, and where the results go."""
    model: str = DEFAULT_MODEL
    modes: list[str] = field(default_factory=lambda: list(MODES))
    steps: int = 3
    seed: int = 0
    batch_size: int = 8
    micro_batch_size: int = 4
    group_size: int = 8
    max_tokens: int = 32
    partial_credit: float = 0.0
    lora_rank: int = 8
    out_dir: str = ""
    mode_timeout: float = 1800.0
    reference: bool = True
    reference_rounds: int = 5
    optimizers: list[str] = field(default_factory=list)
    optimizer_steps: int = 3
    poll_interval: float = 1.0
    trainer_args: list[str] = field(default_factory=list)


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


def ratio(value: float | None, limit: float | None) -> float | None:
    """value / limit, or None where either is unknown or the limit is not positive."""
    if value is None or limit is None or not limit > 0:
        return None
    return value / limit


def failure_reason(log_text: str, limit: int = 240) -> str:
    """One line for the table: the last line that reports an error, else the last line."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    if not lines:
        return "no output"
    errors = [line for line in lines if re.search(r"error|exception|traceback", line, re.I)]
    return (errors or lines)[-1][:limit]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize_mode(mode: str, records: list[dict[str, Any]], vllm: dict[str, Any],
                   reference: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from a mode's per-step records, its vLLM monitor and the limits.

    Step 1 is left out of the timings when there are more steps: the trainer's clock for it
    starts at set-up, so it holds vLLM's start-up. Sync figures are per sync (steps whose
    sync timer ran); `sync_mean_s` is per step, the share of a step the chart stacks. Bytes
    per sync come from the sync code's own `sync/bytes` metric, else BYTES_BY_DESIGN."""
    all_records, records = records, records[1:] if len(records) > 1 else records
    syncs = [r for r in records if r.get("sync_s", 0.0) > 0]
    sync_median = _median([r["sync_s"] for r in syncs])
    measured = [r["sync/bytes"] for r in syncs if "sync/bytes" in r]
    sync_bytes = _median(measured) if measured else BYTES_BY_DESIGN.get(mode)
    train_s = sum(r.get("train_s", 0.0) for r in records)
    tokens = sum(r.get("train/tokens", 0.0) for r in records)
    limit = limit_for(mode, sync_bytes, reference)
    memcpy_s = limit.get("memcpy_s") if limit else None
    nested = mode in SYNC_INSIDE_TRAIN
    parts = {"data": [r.get("data_s", 0.0) for r in records],
             "sync": [r.get("sync_s", 0.0) for r in records],
             "train": [r.get("train_s", 0.0) - (r.get("sync_s", 0.0) if nested else 0.0)
                       for r in records]}
    other = [r["step_s"] - sum(p[i] for p in parts.values()) for i, r in enumerate(records)]
    broadcast_s = limit.get("broadcast_s") if limit else None
    return {
        "mode": mode, "status": "ok", "reason": "", "steps": len(all_records),
        "timed_steps": len(records),
        "step_mean_s": _mean([r["step_s"] for r in records]),
        "step_median_s": _median([r["step_s"] for r in records]),
        "train_mean_s": _mean(parts["train"]), "data_mean_s": _mean(parts["data"]),
        "sync_mean_s": _mean(parts["sync"]), "other_mean_s": _mean(other),
        "sync_median_s": sync_median, "syncs": len(syncs),
        "train_tokens_per_s": tokens / train_s if train_s > 0 else None,
        "gen_tokens_per_s": vllm.get("tokens_per_s"),
        "peak_trainer_gib": max((r.get("peak_mem_gib", 0.0) for r in records), default=None),
        "peak_vllm_gib": vllm.get("peak_rss_gib"),
        "weight_copies": WEIGHT_COPIES.get(mode, "?"),
        "sync_bytes": sync_bytes,
        "sync_bytes_per_s": ratio(sync_bytes, sync_median) if sync_bytes else None,
        "limit_bytes": limit.get("bytes") if limit else None,
        "memcpy_s": memcpy_s, "broadcast_s": broadcast_s,
        "x_memcpy": ratio(sync_median, memcpy_s),
        "x_broadcast": ratio(sync_median, broadcast_s),
        "reward": [r.get("train/reward_mean") for r in all_records],
    }


def limit_for(mode: str, sync_bytes: float | None, reference: list[dict[str, Any]]
              ) -> dict[str, Any] | None:
    """The reference entry for this mode's bytes. shared_vllm moves none between processes;
    its CPU sync re-packs vLLM's weights, so it is set against a copy of the whole model."""
    want = sync_bytes if sync_bytes else ("model" if mode == "shared_vllm" else None)
    for entry in reference:
        if want is not None and (entry["bytes"] == want or entry.get("what") == want):
            return entry
    return None


def failed_row(mode: str, status: str, reason: str) -> dict[str, Any]:
    return {"mode": mode, "status": status, "reason": reason,
            "weight_copies": WEIGHT_COPIES.get(mode, "?")}


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


TABLE_COLUMNS = ("mode", "step mean s", "step median s", "sync s (median)", "data wait s",
                 "train tok/s", "vLLM gen tok/s", "trainer peak GiB", "vLLM peak GiB",
                 "weight copies", "bytes/sync", "sync MB/s", "x memcpy", "x broadcast")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one row per mode (failed modes show their reason)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["mode"], f"{row['status']}: {row['reason']}"] + \
                ["-"] * (len(TABLE_COLUMNS) - 2)
        else:
            cells = [row["mode"], _fmt(row["step_mean_s"], ".2f"),
                     _fmt(row["step_median_s"], ".2f"), _fmt(row["sync_median_s"], ".3f"),
                     _fmt(row["data_mean_s"], ".2f"), _fmt(row["train_tokens_per_s"], ".1f"),
                     _fmt(row["gen_tokens_per_s"], ".1f"), _fmt(row["peak_trainer_gib"], ".2f"),
                     _fmt(row["peak_vllm_gib"], ".2f"), row["weight_copies"],
                     _bytes(row["sync_bytes"]),
                     _fmt(row["sync_bytes_per_s"] / 1e6 if row["sync_bytes_per_s"] else None,
                          ".1f"),
                     _fmt(row["x_memcpy"], ".1f"), _fmt(row["x_broadcast"], ".1f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


OPTIMIZER_COLUMNS = ("optimizer", "step median s", "x adamw", "optimizer.step s",
                     "state MiB", "x adamw", "state on accelerator MiB")


def optimizer_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add step-time and state-memory ratios to adamw's (None where adamw is missing)."""
    base = next((r for r in results if r["name"] == "adamw" and r["status"] == "ok"), None)
    out = []
    for r in results:
        r = dict(r)
        if r["status"] == "ok":
            r["x_adamw_step"] = ratio(r["step_median_s"], base and base["step_median_s"])
            r["x_adamw_state"] = ratio(r["state_bytes"], base and base["state_bytes"])
        out.append(r)
    return out


def format_optimizer_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(OPTIMIZER_COLUMNS) + " |",
             "|" + "|".join("---" for _ in OPTIMIZER_COLUMNS) + "|"]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["name"], f"{r['status']}: {r['reason']}"] + ["-"] * 5
        else:
            cells = [r["name"], _fmt(r["step_median_s"], ".3f"), _fmt(r["x_adamw_step"], ".2f"),
                     _fmt(r["optimizer_step_median_s"], ".3f"),
                     _fmt(r["state_bytes"] / 2**20, ".1f"), _fmt(r["x_adamw_state"], ".2f"),
                     _fmt(r["accelerator_state_bytes"] / 2**20, ".1f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


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
    """The same flags for every mode; `s.trainer_args` come last and win."""
    return [sys.executable, "-m", "example_trainer", "--mode", mode, "--model", s.model,
            "--api-url", api_url, "--vllm-port", str(vllm_port), "--steps", str(s.steps),
            "--seed", str(s.seed), "--batch-size", str(s.batch_size),
            "--micro-batch-size", str(s.micro_batch_size), "--lora-rank", str(s.lora_rank),
            "--eval-size", "0", "--save-path", str(run_dir), "--benchmark",
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
                  vllm=monitor.result(), logs=str(run_dir))
    return report


# --------------------------------------------------------------------------------------
# Reference limits
# --------------------------------------------------------------------------------------

def time_shared_memcpy(nbytes: int, rounds: int, device: torch.device) -> list[float]:
    """Seconds per copy of `nbytes` from this process's memory into a shared-memory
    mapping another process could read without a copy: the floor of any same-machine sync."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="example-trainer-bench-", dir=shm)
    os.close(fd)
    try:
        dst = torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).to(device)
        times = []
        for _ in range(rounds + 1):  # the first round faults the pages in
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[1:]
    finally:
        os.unlink(name)


def measure_reference(model: str, needs: dict[str, int | None], *, rounds: int,
                      lora_rank: int, work: Path) -> list[dict[str, Any]]:
    """Bare memcpy and bare broadcast (to a vLLM worker, over the group lora_nccl uses) of
    each needed byte count; `needs` maps a mode to its bytes per sync, or None for "the
    whole model" (shared_vllm). Starts one vLLM with LoRA and the LoRAReceiver extension."""
    from ..config import TrainConfig
    from ..model import load_model, resolve_model_path
    from ..trainer import pin_trainer_cores, start_vllm, vllm_lora_options
    from ..vllm.server import free_port as vllm_port
    from ..weight_sync import EXTENSION, AdapterBroadcaster

    cfg = TrainConfig(mode="lora_nccl", model=model, lora_rank=lora_rank, dtype="float32",
                      save_path=str(work), vllm_port=vllm_port(), max_token_len=256)
    torch.manual_seed(cfg.seed)
    peft_model, _ = load_model(cfg)
    model_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters()
                      if "lora_" not in n)
    affinity = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        pin_trainer_cores({0})  # vLLM's worker binds to core 0, as in every mode
    server = start_vllm(cfg, resolve_model_path(cfg.model), **vllm_lora_options(cfg),
                        worker_extension_cls=EXTENSION)
    sender = None
    entries: dict[int, dict[str, Any]] = {}
    try:
        sender = AdapterBroadcaster(server.client(), peft_model, "policy",
                                    backend=cfg.lora_sync_backend)
        sender.join()
        device = sender.buckets[0].device
        sizes = {"adapter": sender.nbytes, "model": model_bytes}
        for mode, nbytes in needs.items():
            sizes.setdefault(mode, int(nbytes) if nbytes else model_bytes)
        for what, nbytes in sizes.items():
            if nbytes in entries:
                entries[nbytes]["used_by"].append(what)
                continue
            buckets = None if what == "adapter" else [
                torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device)]
            broadcast = sender.time_bare_broadcast(rounds, buckets=buckets)
            memcpy = time_shared_memcpy(nbytes, rounds, device)
            entries[nbytes] = {"what": what, "bytes": nbytes, "used_by": [what],
                               "broadcast_s": statistics.median(broadcast),
                               "memcpy_s": statistics.median(memcpy),
                               "broadcast_rounds": broadcast, "memcpy_rounds": memcpy,
                               "backend": sender.backend}
            log.info("reference %s: %s, broadcast %.4f s, memcpy %.4f s", what,
                     _bytes(nbytes), entries[nbytes]["broadcast_s"],
                     entries[nbytes]["memcpy_s"])
    finally:
        if sender is not None:
            sender.close()
        server.stop()
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
    return list(entries.values())


# --------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------

def fixed_batch(vocab_size: int, *, size: int = 4, length: int = 64, seed: int = 0) -> Any:
    """A random but fixed batch: half prompt, half trained tokens, advantages +-1."""
    from ..batch import Batch
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (size, length), generator=gen)
    loss_mask = torch.zeros(size, length - 1)
    loss_mask[:, length // 2:] = 1.0
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(size)])
    return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 loss_mask=loss_mask, advantages=signs[:, None].expand(size, length - 1).clone(),
                 old_logprobs=torch.full((size, length - 1), float("nan")), ref_logprobs=None,
                 temperatures=torch.ones(size), scores=signs.clone())


def compare_optimizers(model: str, names: Sequence[str], *, steps: int, seed: int
                       ) -> list[dict[str, Any]]:
    """Full fine-tuning steps of the same model on the same batch with each optimizer."""
    from ..config import TrainConfig
    from ..model import load_model
    from ..optim import build_optimizer, optimizer_state_bytes
    from ..step import grpo_step

    results = []
    for name in names:
        cfg = TrainConfig(mode="legacy", model=model, seed=seed, optimizer=name,
                          micro_batch_size=4, lr=1e-5)
        try:
            torch.manual_seed(seed)
            net, tokenizer = load_model(cfg)
            optimizer = build_optimizer(name, net.parameters(), cfg.lr,
                                        weight_decay=cfg.weight_decay)
            marks: list[float] = []
            optimizer.register_step_pre_hook(lambda *_: marks.append(time.perf_counter()))
            optimizer.register_step_post_hook(lambda *_: marks.append(time.perf_counter()))
            batch = fixed_batch(len(tokenizer), seed=seed)
            step_s, opt_s = [], []
            for i in range(steps + 1):  # the first step allocates the state: dropped
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.clear()
                t0 = time.perf_counter()
                grpo_step(net, optimizer, batch, cfg)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i:
                    step_s.append(time.perf_counter() - t0)
                    opt_s.append(marks[1] - marks[0] if len(marks) == 2 else float("nan"))
            state = optimizer_state_bytes(optimizer)
            results.append({"name": name, "status": "ok", "reason": "",
                            "step_s": step_s, "step_median_s": statistics.median(step_s),
                            "optimizer_step_median_s": statistics.median(opt_s),
                            "state_bytes": state["cpu"] + state["accelerator"],
                            "accelerator_state_bytes": state["accelerator"], "state": state,
                            "params": sum(p.numel() for p in net.parameters())})
            log.info("optimizer %s: step %.3f s, state %.1f MiB", name,
                     results[-1]["step_median_s"], results[-1]["state_bytes"] / 2**20)
            del net, optimizer
        except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes without CPU kernels
            log.warning("optimizer %s failed: %s: %s", name, type(exc).__name__, exc)
            results.append({"name": name, "status": "failed",
                            "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return results


# --------------------------------------------------------------------------------------
# Chart and the whole run
# --------------------------------------------------------------------------------------

def draw_chart(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Left: mean step time per mode, stacked train / sync / data wait / other (the rest
    of the step: parity probe, checkpoint); right: reward over steps per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["mode"] for r in ok]
    bottom = [0.0] * len(ok)
    for key, label, color in (("train_mean_s", "train", "#4c72b0"),
                              ("sync_mean_s", "sync", "#dd8452"),
                              ("data_mean_s", "data wait", "#55a868"),
                              ("other_mean_s", "other", "#b0b0b0")):
        heights = [max(r.get(key) or 0.0, 0.0) for r in ok]
        left.bar(names, heights, bottom=bottom, label=label, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    warm = any(r.get("timed_steps", 0) < r.get("steps", 0) for r in ok)
    left.set_ylabel("mean seconds per step" + (" (after step 1)" if warm else ""))
    left.set_title("step time breakdown")
    left.legend()
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]  # modes may overlap
    for i, r in enumerate(ok):
        rewards = [(j + 1, v) for j, v in enumerate(r["reward"]) if v is not None]
        if rewards:
            marker, line = styles[i % len(styles)]
            right.plot(*zip(*rewards), marker=marker, linestyle=line, alpha=0.8,
                       label=r["mode"])
    from matplotlib.ticker import MaxNLocator
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("step")
    right.set_ylabel("train/reward_mean")
    right.set_title("reward over steps")
    if ok:
        right.legend()
    failed = [f"{r['mode']} ({r['status']})" for r in rows if r["status"] != "ok"]
    fig.suptitle(title + (f"  not run: {', '.join(failed)}" if failed else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def run(s: BenchSettings) -> dict[str, Any]:
    """The whole comparison; writes `bench.json` and `bench.png` into `s.out_dir`."""
    from ..model import resolve_model_path

    out = Path(s.out_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bench.json", out / "bench.png"
    model_path = resolve_model_path(s.model)
    payload: dict[str, Any] = {"machine": machine_info(), "settings": asdict(s),
                               "model_path": model_path, "modes": {}, "reference": [],
                               "table": [], "optimizers": []}
    for mode in s.modes:
        log.info("mode %s: fresh API, environment, trainer and vLLM (logs in %s)", mode,
                 out / mode)
        result = run_mode(mode, s, model_path, out)
        payload["modes"][mode] = result
        log.info("mode %s: %s%s (%.0f s)", mode, result["status"],
                 f" - {result['reason']}" if result["reason"] else "", result["wall_s"]
                 if "wall_s" in result else 0.0)
        write_json(json_path, payload)  # partial results survive a crash of a later mode

    ok = {m: r for m, r in payload["modes"].items() if r["status"] == "ok"}
    if s.reference and ok:
        needs: dict[str, int | None] = {}
        for mode, result in ok.items():
            row = summarize_mode(mode, result.get("steps", []), result["vllm"], [])
            needs[mode] = int(row["sync_bytes"]) if row["sync_bytes"] else None
        try:
            payload["reference"] = measure_reference(
                s.model, needs, rounds=s.reference_rounds, lora_rank=s.lora_rank,
                work=out / "reference")
        except Exception as exc:  # noqa: BLE001 - the modes' rows still stand
            log.error("reference limits failed: %s: %s", type(exc).__name__, exc)
            payload["reference_error"] = f"{type(exc).__name__}: {exc}"

    rows = []
    for mode, result in payload["modes"].items():
        if result["status"] == "ok":
            rows.append(summarize_mode(mode, result.get("steps", []), result["vllm"],
                                       payload["reference"]))
        else:
            rows.append(failed_row(mode, result["status"], result["reason"]))
    payload["table"] = rows

    if s.optimizers:
        payload["optimizers"] = optimizer_rows(compare_optimizers(
            s.model, s.optimizers, steps=s.optimizer_steps, seed=s.seed))

    machine = payload["machine"]
    title = (f"{Path(model_path).name}, {s.steps} steps, batch {s.batch_size}; "
             f"{machine.get('gpu') or machine.get('cpu')}, {machine.get('cores')} cores")
    if rows:
        payload["chart"] = str(draw_chart(rows, png_path, title))
    payload["text"] = report(payload)
    write_json(json_path, payload)
    log.info("mode comparison (%s):\n%s", title, payload["text"])
    log.info("JSON: %s%s", json_path, f"; chart: {png_path}" if rows else "")
    return payload


def report(payload: dict[str, Any]) -> str:
    """The table(s) as printed and pasted into the README."""
    parts = []
    if payload["table"]:
        parts.append(format_table(payload["table"]))
        backend = next((e["backend"] for e in payload["reference"]), "-")
        parts.append(f"Timings leave out step 1 (it includes start-up) when a mode ran more "
                     f"steps. x memcpy / x broadcast: median sync time over a bare copy into "
                     f"shared memory / a bare {backend} broadcast to a vLLM worker of the same "
                     "bytes, measured in this run (shared_vllm: of the whole model, what its "
                     "CPU re-pack copies). vLLM peak: RSS summed over its process group.")
    if payload.get("optimizers"):
        parts.append(format_optimizer_table(payload["optimizers"]))
    return "\n\n".join(parts)
