"""Trainer-side half of `lora_nccl`: broadcast a peft adapter to vLLM's workers, no disk.

The trainer is rank 0 of a standalone process group (gloo on CPU, NCCL when both sides are
CUDA) that it shares with the workers' `LoRAReceiver` extension
(`example_trainer/vllm/worker_extension.py`). `collective_rpc` blocks vLLM's engine loop
until the broadcast it waits for arrives, so every collective here starts the HTTP call in a
thread first, then does its own half, then joins the thread (with a timeout).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any, Callable

import torch

from .vllm.client import VLLMClient
from .vllm.server import free_port
from .vllm.worker_extension import broadcast, make_group

log = logging.getLogger(__name__)

EXTENSION = "example_trainer.vllm.worker_extension.LoRAReceiver"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class WeightSyncError(RuntimeError):
    """A worker did not answer, or answered with an error, during a weight sync."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto': NCCL only when the trainer is on CUDA (vLLM then is too), gloo otherwise."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def peft_name(name: str) -> str:
    """peft's parameter name -> the name in a saved adapter (what vLLM parses)."""
    return name.replace(".default.", ".")


def drop_stale_prefix_cache(client: VLLMClient, *, preempt_running: bool) -> None:
    """After an in-memory swap the cache keys (adapter id) are unchanged, so cached blocks
    hold the old policy's KV. Blocks of running requests can't be dropped: without a pause,
    preempt those requests (vLLM recomputes them under the new weights), or the reset
    silently does nothing."""
    if not client.reset_prefix_cache(reset_running_requests=preempt_running):
        raise WeightSyncError("vLLM did not reset its prefix cache after the adapter swap "
                              "(blocks still held by running requests); new requests could "
                              "reuse the old adapter's KV. Use --sync-pause wait.")


class _Call:
    """One `collective_rpc` running in a thread while this process does its collective half."""

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        self.what, self.result, self.error = what, None, None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=f"rpc-{what}",
                                       daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # re-raised in join(), in the caller's thread
            self.error = exc

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise WeightSyncError(f"vLLM did not answer {self.what} within {timeout:.0f} s")
        if self.error is not None:
            raise WeightSyncError(f"{self.what} failed in vLLM: {self.error}") from self.error
        return self.result


class AdapterBroadcaster:
    """Holds the group, the packing buckets and the cached parameter list of one adapter."""

    def __init__(self, client: VLLMClient, model: torch.nn.Module, adapter_name: str, *,
                 backend: str = "auto", workers: int = 1, timeout_s: float = 120.0,
                 host: str = "127.0.0.1") -> None:
        self.client, self.name, self.timeout_s = client, adapter_name, timeout_s
        self.world_size, self.host = 1 + workers, host
        self.params = [(peft_name(n), p) for n, p in model.named_parameters()
                       if p.requires_grad and "lora_" in n]
        if not self.params:
            raise ValueError("the model has no trainable LoRA parameters to broadcast")
        device = self.params[0][1].device
        self.backend = resolve_backend(backend, device)
        bucket_device = device if self.backend == "nccl" else torch.device("cpu")
        dtypes = list(dict.fromkeys(p.dtype for _, p in self.params))
        self.groups = [[p for _, p in self.params if p.dtype == d] for d in dtypes]
        self.buckets = [torch.empty(sum(p.numel() for p in g), dtype=d, device=bucket_device)
                        for g, d in zip(self.groups, dtypes)]
        self.specs = [[n, list(p.shape), DTYPE_NAMES[p.dtype]] for n, p in self.params]
        self.peft_config = json.loads(json.dumps(
            model.peft_config["default"].to_dict(), default=lambda v: sorted(v)
            if isinstance(v, (set, frozenset)) else str(v)))
        self.group: Any = None
        self.version = 0
        self.broken = False  # a sync failed: the workers can't be asked to tear down

    def _rpc(self, method: str, **kwargs: Any) -> _Call:
        return _Call(lambda: self.client.collective_rpc(method, kwargs=kwargs,
                                                        timeout=self.timeout_s), method)

    def join(self) -> None:
        """Rendezvous on a fresh port; the prefix is unique per run, so a stale store can't
        be joined. vLLM worker i becomes rank 1 + i."""
        port, prefix = free_port(self.host), f"lora_nccl-{uuid.uuid4().hex}"
        init_method = f"tcp://{self.host}:{port}/{prefix}"
        call = self._rpc("join_weight_group", init_method=init_method, rank_offset=1,
                         world_size=self.world_size, backend=self.backend,
                         timeout_s=self.timeout_s)
        self.group = make_group(self.host, port, prefix, 0, self.world_size, self.backend,
                                self.timeout_s)
        call.join(self.timeout_s + 30)
        log.info("weight-sync group up: %s, %s", init_method, self.backend)

    @torch.no_grad()
    def pack(self) -> None:
        """Copy every adapter tensor into its dtype's flat bucket (one cat per bucket)."""
        for group, bucket in zip(self.groups, self.buckets):
            torch.cat([p.detach().reshape(-1) for p in group], out=bucket)

    def sync(self) -> dict[str, float]:
        """Send the current adapter; vLLM serves it from its next engine step on."""
        if self.group is None:
            raise WeightSyncError("sync before join()")
        t0 = time.perf_counter()
        self.pack()
        t1 = time.perf_counter()
        call = self._rpc("receive_adapter", name=self.name, specs=self.specs,
                         peft_config=self.peft_config,
                         bucket_numels=[b.numel() for b in self.buckets])
        try:
            for bucket in self.buckets:
                broadcast(self.group, bucket, self.timeout_s)
        except RuntimeError as exc:  # gloo/NCCL: peer gone or timed out
            self.broken = True
            raise WeightSyncError(f"broadcasting the adapter to vLLM's workers failed within "
                                  f"--sync-timeout {self.timeout_s:.0f} s: {exc}. Is vLLM "
                                  "still running? See its log.") from exc
        try:
            results = call.join(self.timeout_s + 30)
        except WeightSyncError:
            self.broken = True
            raise
        if len(results) != self.world_size - 1 or not all(isinstance(r, dict) for r in results):
            raise WeightSyncError(f"receive_adapter: unexpected worker answers {results!r:.500}")
        self.version += 1
        t2 = time.perf_counter()
        return {"sync/pack_s": t1 - t0, "sync/send_s": t2 - t1,
                "sync/install_s": max(r["install_s"] for r in results),
                # 1 when every worker copied into its active slot (the fast path), 0 when
                # vLLM rebuilt the adapter (first syncs, after an eviction)
                "sync/slot_copy": float(all(r.get("path") == "slot copy" for r in results)),
                "sync/bytes": float(self.nbytes)}

    @property
    def nbytes(self) -> int:
        """Bytes one sync broadcasts (all buckets), for the mode comparison's bytes/s."""
        return sum(b.numel() * b.element_size() for b in self.buckets)

    def time_bare_broadcast(self, rounds: int = 20,
                            buckets: list[torch.Tensor] | None = None) -> list[float]:
        """Seconds per bare broadcast of the adapter's buckets (or of `buckets`, e.g. one of
        a full model's size) to the workers, no rpc and no install: the floor `sync()` is
        compared with. One warm-up round is dropped (it includes the rpc that makes the
        workers listen)."""
        buckets = self.buckets if buckets is None else buckets
        call = self._rpc("receive_bare", bucket_numels=[b.numel() for b in buckets],
                         dtypes=[DTYPE_NAMES[b.dtype] for b in buckets],
                         rounds=rounds + 1)
        times = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            for bucket in buckets:
                broadcast(self.group, bucket, self.timeout_s)
            times.append(time.perf_counter() - t0)
        call.join(self.timeout_s + 30)
        return times[1:]

    def abandon(self) -> None:
        """Drop the group without telling the workers: they died with their server."""
        self.broken = True
        self.close()

    def close(self) -> None:
        """Coordinated tear-down: workers drop their group, then we drop ours. Best effort:
        runs on exit, possibly after a failure, and must not hide the original error."""
        if self.group is None:
            return
        group, self.group = self.group, None
        if not self.broken and not self.client.health():  # dead or hung: nobody to tell
            log.warning("weight-sync tear-down: vLLM does not answer /health; dropping the "
                        "group without telling its workers")
            self.broken = True
        if not self.broken:
            try:
                self._rpc("destroy_weight_group").join(min(30.0, self.timeout_s))
            except WeightSyncError as exc:
                log.warning("weight-sync tear-down: %s", exc)
        if hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except RuntimeError as exc:
                log.warning("weight-sync group shutdown: %s", exc)
