"""The vLLM server a mode syncs to, behind one handle, whoever started it.

Every mode gets its server the same way: `run.serve(model_path, **options)` after
`TrainingRun.setup`, or `VLLM.open(cfg, ...)` before it when the model itself comes from the
server (shared_vllm), handed to setup with `vllm=`. Either starts vLLM or, with `--vllm-url`,
attaches to the user's. The handle offers what a mode's sync needs:

- `.url` and `.client` (an HTTP client for the OpenAI and dev-mode endpoints);
- `.guard()` around calls that may meet a dying server: with --restart-vllm-on-failure a
  server the run started that exits is restarted, the `.on_restart(fn)` hooks make it serve
  the current policy again (a fresh server knows no adapter and no weight-sync group), and
  the interrupted call counts as done, because the resync sent the current weights;
- `.restart(path)`, for a mode that serves each version by restarting (legacy);
- `.health_watch()`, which the run polls while it waits for data, so a dead or hung server
  fails the wait at once instead of running out the batch timeout.

On a CPU machine vLLM (worker, engine core and API server, `VLLMServer` confines them all) runs
on core 0, and the trainer is pinned to the other cores: unpinned, the two fight over the
cores and a training step gets 10-20x slower (measured on a 2-core machine: 10-20 s against
about 1 s per SmolLM2 forward+backward). When only the worker kept to core 0, the engine core
and API server shared the trainer's core: the default run's steps took 18.5 s instead of 14.3.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import ConfigError, TrainConfig
from .vllm.client import VLLMClient
from .vllm.health import HealthWatch
from .vllm.server import VLLMGone, VLLMServer

log = logging.getLogger(__name__)

# --restart-vllm-on-failure gives up after this many restarts in one run: a server that keeps
# dying has a cause a restart will not fix.
MAX_VLLM_RESTARTS = 3

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank


def pin_trainer_cores(reserved_for_vllm: set[int]) -> None:
    """On CPU, keep the trainer off the cores vLLM's worker binds to (see the module doc)."""
    available = os.sched_getaffinity(0)
    mine = available - reserved_for_vllm
    if not mine or mine == available:
        return
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    log.info("trainer pinned to cores %s, vLLM to %s", sorted(mine), sorted(reserved_for_vllm))


def start_vllm(cfg: TrainConfig, model_path: str | Path, **options: Any) -> VLLMServer:
    """Start vLLM as the config says; options are VLLMServer's (LoRA, worker extension).

    The caller owns the server; modes use `VLLM.open` / `run.serve`, which stop it on exit."""
    gpu = torch.cuda.is_available()
    server = VLLMServer(
        model_path, host=cfg.vllm_host, port=cfg.vllm_port,
        served_model_name=options.pop("served_model_name", cfg.served_name),
        max_model_len=cfg.max_token_len, enforce_eager=cfg.vllm_enforce_eager,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization if gpu else None,
        tensor_parallel_size=cfg.vllm_tensor_parallel_size if gpu else None,
        kv_cache_gib=None if gpu else cfg.vllm_kv_cache_gib, seed=cfg.seed,
        log_path=Path(cfg.save_path) / "vllm.log",
        extra_args=[*cfg.vllm_extra_args, *options.pop("extra_args", ())],
        startup_timeout=cfg.vllm_startup_timeout, dev_mode=True,
        # Sampled-token log-probs after temperature, the distribution the trainer's
        # logits / T reproduces (vLLM's default is the raw, pre-temperature one).
        logprobs_mode="processed_logprobs", **options)
    Path(cfg.save_path).mkdir(parents=True, exist_ok=True)
    server.start()
    log.info("vLLM serving %s as %r at %s (start-up %.1f s)", model_path,
             server.model_name, server.url, server.startup_seconds)
    return server


def vllm_lora_options(cfg: TrainConfig) -> dict[str, Any]:
    """Serve the base model as 'base' and leave `served_name` to the adapter."""
    if not cfg.is_lora:
        raise ConfigError(f"--mode {cfg.mode} serves a LoRA adapter but trains the full "
                          "model: declare TRAINS = 'lora' in the mode file and pass it to "
                          "TrainingRun.setup")
    rank = next((r for r in VLLM_LORA_RANKS if r >= cfg.lora_rank), None)
    if rank is None:
        raise ConfigError(f"--lora-rank {cfg.lora_rank} exceeds vLLM's largest LoRA rank 512")
    return dict(served_model_name="base", enable_lora=True, max_lora_rank=rank)


class VLLM:
    """One vLLM server for one run: the one it started (`server`) or the user's (`--vllm-url`)."""

    def __init__(self, cfg: TrainConfig, url: str, server: VLLMServer | None = None) -> None:
        self.cfg, self.url, self.server = cfg, url.rstrip("/"), server
        self.client = VLLMClient(self.url, pause_timeout=cfg.sync_timeout)
        self.restarts = 0
        self._restart_s = 0.0
        self._resyncs: list[Callable[[], None]] = []
        self._served_again: list[Callable[[], None]] = []

    @classmethod
    def open(cls, cfg: TrainConfig, model_path: str | Path, *, restarts: bool = False,
             **options: Any) -> "VLLM":
        """Start vLLM on `model_path` with `options`, or attach to `--vllm-url` (then the
        options say how the user must have started it: see each mode's docstring).
        `restarts`: the mode restarts the server on each new checkpoint, so it must own it."""
        if cfg.vllm_url and restarts:
            raise ConfigError(f"--mode {cfg.mode} restarts vLLM on each new checkpoint, so it "
                              "cannot use a server you started (--vllm-url); drop --vllm-url "
                              "or use a mode that syncs in memory")
        if cfg.vllm_url:
            log.info("using the vLLM server at %s (--vllm-url)", cfg.vllm_url)
            return cls(cfg, cfg.vllm_url)
        if not torch.cuda.is_available():
            pin_trainer_cores({0})  # VLLMServer binds vLLM's worker to core 0 on CPU
        server = start_vllm(cfg, model_path, **options)
        return cls(cfg, server.url, server)

    def on_restart(self, resync: Callable[[], None]) -> None:
        """Register what makes a restarted server serve the current policy again."""
        self._resyncs.append(resync)

    def on_served_again(self, announce: Callable[[], None]) -> None:
        """Register what follows a restart once every resync has run (the run publishes the
        weight version the new server now serves)."""
        self._served_again.append(announce)

    def restart(self, model_path: str | Path | None = None) -> float:
        """Restart the server this run started, on `model_path`; start-up seconds."""
        if self.server is None:
            raise ConfigError(f"--mode {self.cfg.mode} restarts vLLM on each new checkpoint, "
                              "so it cannot use a server you started (--vllm-url); drop "
                              "--vllm-url or use a mode that syncs in memory")
        return self.server.restart(model_path)

    def recover(self, reason: str) -> None:
        """--restart-vllm-on-failure: restart the server this run started (on its current
        model) and resync; VLLMGone without the flag or once MAX_VLLM_RESTARTS are used."""
        if self.server is None or not self.cfg.restart_vllm_on_failure:
            raise VLLMGone(reason)
        if self.restarts >= MAX_VLLM_RESTARTS:
            raise VLLMGone(f"{reason}\n(gave up: vLLM was already restarted "
                           f"{self.restarts} times in this run)")
        self.restarts += 1
        log.warning("%s\nrestarting vLLM (%d of at most %d, --restart-vllm-on-failure)",
                    reason, self.restarts, MAX_VLLM_RESTARTS)
        t0 = time.monotonic()
        self.server.restart()
        for hook in self._resyncs + self._served_again:
            hook()
        self._restart_s += time.monotonic() - t0
        log.warning("vLLM restarted and serves the current weights again (%.1f s)",
                    time.monotonic() - t0)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around calls to vLLM (a sync, the parity probe): with --restart-vllm-on-failure an
        error because the server we started has exited is answered by `recover`; any other
        error propagates unchanged."""
        try:
            yield
        except Exception as exc:
            if not self.cfg.restart_vllm_on_failure or self.server is None:
                raise
            code = self.server.exit_code(wait_s=5)  # a killed server's socket closes first
            if code is None:
                raise  # vLLM runs: a real error, not a dead server
            self.recover(self.server.failure_message(
                f"vLLM exited with code {code} during training ({type(exc).__name__} "
                "while talking to it)"))

    def health_watch(self) -> HealthWatch:
        """A liveness check for the wait for data (see HealthWatch)."""
        restart = self.recover if self.cfg.restart_vllm_on_failure else None
        return HealthWatch(self.url, server=self.server, timeout_s=self.cfg.sync_timeout,
                           on_failure=restart)

    def pop_metrics(self) -> dict[str, float]:
        """`vllm/restarts` (so far in this run) and this step's `vllm/restart_s`."""
        if not self.restarts:
            return {}
        seconds, self._restart_s = self._restart_s, 0.0
        return {"vllm/restarts": float(self.restarts), "vllm/restart_s": seconds}

    def stop(self) -> None:
        """Stop the server this run started (by its process group); a user's server stays."""
        if self.server is not None:
            self.server.stop()
