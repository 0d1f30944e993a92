"""Trainer-side half of `lora_nccl`: broadcast a peft adapter to vLLM's workers, no disk.

The trainer is rank 0 of a standalone process group (gloo on CPU, NCCL when both sides are
CUDA) that it shares with the workers' `LoRAReceiver` extension
(`example_trainer/vllm/worker_extension.py`). `collective_rpc` blocks vLLM's engine loop
until the broadcast it waits for arrives, so every collective here starts the HTTP call in a
thread first, then does its own half, then joins the thread (with a timeout).

The adapter's parameters live in the send buckets: `AdapterBroadcaster` re-points each one's
`.data` at its slice of one flat buffer per dtype, so the optimizer updates the buckets in
place and a sync has nothing to pack. A model sharded by FSDP2 (torchrun) is gathered into
the buckets instead, by every rank together, and rank 0 sends.

A group's first sync is one rpc (receive, install, then the prefix-cache reset, requested
once every worker holds the buckets). It leaves the workers listening: every later sync is
announced in the group's store, broadcast, and confirmed by a barrier, and vLLM installs it
at its next engine step; only the prefix-cache reset is still an HTTP call.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Callable

import torch

from .background import in_background
from .distributed import full_tensor
from .vllm.client import VLLMClient
from .vllm.server import free_port
from .vllm.worker_extension import (barrier, broadcast, exchange_max, open_group,
                                    stream_key)

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


def is_scaled_half(name: str) -> bool:
    """The half of a LoRA pair vLLM scales by alpha / r when it installs it (lora_B)."""
    return re.search(r"\.lora_(embedding_)?B(\.|$)", name) is not None


def bucket_order(names: list[str]) -> list[int]:
    """Indices of `names` in send order: the unscaled halves (lora_A) first, then the
    scaled ones (lora_B), each in model order, so the worker scales one contiguous run."""
    return sorted(range(len(names)), key=lambda i: is_scaled_half(names[i]))


def drop_stale_prefix_cache(client: VLLMClient, *, preempt_running: bool) -> None:
    """After an in-memory swap the cache keys (adapter id) are unchanged, so cached blocks
    hold the old policy's KV. Blocks of running requests can't be dropped: without a pause,
    preempt those requests (vLLM recomputes them under the new weights), or the reset
    silently does nothing."""
    if not client.reset_prefix_cache(reset_running_requests=preempt_running):
        raise WeightSyncError("vLLM did not reset its prefix cache after the adapter swap "
                              "(blocks still held by running requests); new requests could "
                              "reuse the old adapter's KV. Use --sync-pause wait.")


class BackgroundCall:
    """A call into vLLM (HTTP) running in a thread while this process does its collective
    half; `join` bounds the wait and names the call in its error."""

    def __init__(self, fn: Callable[[], Any], what: str) -> None:
        self.what = what
        self.future = in_background(fn, f"rpc-{what}")

    @property
    def failed(self) -> bool:
        """It has ended with an error (`join` raises it)."""
        return self.future.done() and self.future.exception() is not None

    def join(self, timeout: float) -> Any:
        try:
            self.future.exception(timeout)  # waits; raises TimeoutError only if still running
        except TimeoutError:
            raise WeightSyncError(f"vLLM did not answer {self.what} within "
                                  f"{timeout:.0f} s") from None
        error = self.future.exception(0)
        if error is not None:
            raise WeightSyncError(f"{self.what} failed in vLLM: {error}") from error
        return self.future.result(0)


class AdapterBroadcaster:
    """Holds the group and the send buckets of one adapter; the adapter's parameters are
    views into the buckets (when they share a device), so nothing is packed per sync."""

    def __init__(self, client: VLLMClient, model: torch.nn.Module, adapter_name: str, *,
                 backend: str = "auto", workers: int = 1, timeout_s: float = 120.0,
                 host: str = "127.0.0.1") -> None:
        self.client, self.name, self.timeout_s = client, adapter_name, timeout_s
        self.world_size, self.host = 1 + workers, host
        # Under torchrun (FSDP2) each rank holds shards: every rank gathers the adapter in
        # `pack` (a collective), rank 0 alone joins vLLM's group and sends.
        data_parallel = getattr(model, "data_parallel", None)
        self.sharded = data_parallel is not None
        self.sends = data_parallel is None or data_parallel.is_main
        params = [(peft_name(n), p) for n, p in model.named_parameters()
                  if p.requires_grad and "lora_" in n]
        if not params:
            raise ValueError("the model has no trainable LoRA parameters to broadcast")
        self.params = [params[i] for i in bucket_order([n for n, _ in params])]
        # A sharded model computes (and gathers) on its rank's device, wherever FSDP2 keeps
        # the shards (in CPU memory under --optimizer adamw_cpu).
        device = data_parallel.device if self.sharded else self.params[0][1].device
        self.device = device
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
        self.store: Any = None
        self.stream: str | None = None  # the workers' listening session, None: next sync is an rpc
        self.stream_number = 0
        self.version = 0
        self.layout_sent = False  # specs and config go with a group's first sync only
        self.broken = False  # a sync failed: the workers can't be asked to tear down
        # Views into the buckets need the buckets on the parameters' device (not so for
        # CUDA parameters sent over gloo: those are packed every sync).
        self.aliased = not self.sharded and all(p.device == bucket_device
                                                for _, p in self.params)
        self._pointers: list[int] = []
        self.pack()

    def _alias(self) -> None:
        """Copy every parameter into its slice of its dtype's bucket and make the slice its
        storage (`.data`): the parameter object stays the same, so the optimizer, its state,
        fp32 masters and peft keep working, and every in-place update lands in the bucket."""
        with torch.no_grad():
            for group, bucket in zip(self.groups, self.buckets):
                offset = 0
                for p in group:
                    view = bucket[offset:offset + p.numel()].view(p.shape)
                    view.copy_(p)
                    p.data = view
                    offset += p.numel()
        self._pointers = [p.data_ptr() for _, p in self.params]

    @torch.no_grad()
    def pack(self) -> None:
        """Make the buckets hold the current adapter: nothing to do while the parameters are
        views into them; otherwise one cat per bucket, or (re-)aliasing."""
        if self.aliased:
            if [p.data_ptr() for _, p in self.params] != self._pointers:
                if self._pointers:  # something replaced a parameter's storage since
                    log.warning("LoRA parameters no longer live in the send buckets (their "
                                ".data was replaced); copying them back in")
                self._alias()
            return
        for group, bucket in zip(self.groups, self.buckets):
            torch.cat([(full_tensor(p, self.device) if self.sharded else p).detach().reshape(-1)
                       for p in group], out=bucket)

    def _rpc(self, method: str, **kwargs: Any) -> BackgroundCall:
        return BackgroundCall(lambda: self.client.collective_rpc(
            method, kwargs=kwargs, timeout=self.timeout_s), method)

    def join(self) -> None:
        """Rendezvous on a fresh port; the prefix is unique per run, so a stale store can't
        be joined. vLLM worker i becomes rank 1 + i. Other data-parallel ranks join nothing."""
        if not self.sends:
            return
        port, prefix = free_port(self.host), f"lora_nccl-{uuid.uuid4().hex}"
        self.layout_sent, self.stream = False, None
        init_method = f"tcp://{self.host}:{port}/{prefix}"
        call = self._rpc("join_weight_group", init_method=init_method, rank_offset=1,
                         world_size=self.world_size, backend=self.backend,
                         timeout_s=self.timeout_s)
        self.group, self.store = open_group(self.host, port, prefix, 0, self.world_size,
                                            self.backend, self.timeout_s)
        call.join(self.timeout_s + 30)
        log.info("weight-sync group up: %s, %s", init_method, self.backend)

    def sync(self, *, reset_prefix_cache: bool = True,
             preempt_running: bool = False) -> dict[str, float]:
        """Send the current adapter; vLLM serves it from its next engine step on, and the
        prefix cache holds nothing computed with the old one (`reset_prefix_cache`; see
        `drop_stale_prefix_cache` for `preempt_running`). Every wait is bounded by the sync
        timeout. On a data-parallel rank other than 0: its part of the gather only."""
        if not self.sends:
            self.pack()
            return {}
        if self.group is None:
            raise WeightSyncError("sync before join()")
        t0 = time.perf_counter()
        self.pack()
        t1 = time.perf_counter()
        send = self._send_streamed if self.stream is not None else self._send_by_rpc
        figures = send(reset_prefix_cache, preempt_running)
        self.version += 1
        return {"sync/pack_s": t1 - t0, "sync/send_s": time.perf_counter() - t1, **figures,
                "sync/bytes": float(self.nbytes)}

    def _send_failed(self, exc: Exception) -> WeightSyncError:
        """The group is unusable after a failed collective: mark it, and say what to check."""
        self.broken = True
        return WeightSyncError(f"broadcasting the adapter to vLLM's workers failed within "
                               f"--sync-timeout {self.timeout_s:.0f} s: {exc}. Is vLLM still "
                               "running? See its log.")

    def _send_streamed(self, reset_prefix_cache: bool,
                       preempt_running: bool) -> dict[str, float]:
        """Announce the sync in the store and meet the workers' listeners at a barrier: past
        it, each holds the lock its engine's next step waits for, so no forward pass can run
        on the old adapter any more and the prefix-cache reset goes out at once, alongside
        the broadcast (vLLM handles it between engine steps: any step that cached old-adapter
        blocks has finished by then). The install happens at that next step; the figures the
        barrier brings back (and a failure) are those of the previous sync's receive and
        install."""
        key = stream_key(self.stream, self.stream_number)
        t0 = time.perf_counter()
        reset = None
        try:
            self.store.set(key, "sync")
            failed, receive_s, install_s, not_slot_copy = exchange_max(
                self.group, [0.0, 0.0, 0.0, 0.0], self.buckets[0].device, self.timeout_s)
            t1 = time.perf_counter()
            if reset_prefix_cache:
                reset = BackgroundCall(lambda: drop_stale_prefix_cache(
                    self.client, preempt_running=preempt_running), "reset_prefix_cache")
            for bucket in self.buckets:
                broadcast(self.group, bucket, self.timeout_s)
        except RuntimeError as exc:  # gloo/NCCL/store: peer gone or timed out
            raise self._send_failed(exc) from exc
        self.stream_number += 1
        t2 = time.perf_counter()
        if reset is not None:
            reset.join(self.timeout_s + 30)
        if failed:
            raise WeightSyncError("a vLLM worker failed to install the adapter it received "
                                  "(it still serves an older one); its log has the error")
        # the rpc's figures under the same names; the receive and install: the last sync's
        return {"sync/barrier_s": t1 - t0, "sync/broadcast_s": t2 - t1,
                "sync/reset_s": time.perf_counter() - t2,  # the reset's wait after the send
                "sync/receive_s": receive_s, "sync/install_s": install_s,
                "sync/slot_copy": 1.0 - not_slot_copy, "sync/streamed": 1.0}

    def _send_by_rpc(self, reset_prefix_cache: bool,
                     preempt_running: bool) -> dict[str, float]:
        """One rpc does the whole swap: the workers receive the buckets, confirm with a
        barrier, and install. Once the barrier passed, the rpc is running in vLLM's engine
        loop, so the prefix-cache reset requested then is handled right after the install if
        it arrives before the rpc returns, else after the next engine step at the latest.
        The workers then listen for the next syncs (`_send_streamed`)."""
        t1 = time.perf_counter()
        session = uuid.uuid4().hex[:12]
        kwargs: dict[str, Any] = {"name": self.name,
                                  "bucket_numels": [b.numel() for b in self.buckets],
                                  "dtypes": [DTYPE_NAMES[b.dtype] for b in self.buckets],
                                  "stream_session": session}
        if not self.layout_sent:
            kwargs |= {"specs": self.specs, "peft_config": self.peft_config}
        call = self._rpc("receive_adapter", **kwargs)
        try:
            for bucket in self.buckets:
                broadcast(self.group, bucket, self.timeout_s)
            barrier(self.group, self.buckets[0].device, self.timeout_s)
        except RuntimeError as exc:  # gloo/NCCL: peer gone or timed out
            raise self._send_failed(exc) from exc
        t2 = time.perf_counter()
        reset = (BackgroundCall(lambda: drop_stale_prefix_cache(
            self.client, preempt_running=preempt_running), "reset_prefix_cache")
            if reset_prefix_cache else None)
        try:
            results = call.join(self.timeout_s + 30)
        except WeightSyncError:
            self.broken = True
            raise
        self.layout_sent = True
        if len(results) != self.world_size - 1 or not all(isinstance(r, dict) for r in results):
            raise WeightSyncError(f"receive_adapter: unexpected worker answers {results!r:.500}")
        if all(r.get("streaming") for r in results):
            self.stream, self.stream_number = session, 0
        t3 = time.perf_counter()
        if reset is not None:
            reset.join(self.timeout_s + 30)
        t4 = time.perf_counter()
        return {"sync/broadcast_s": t2 - t1,  # rpc start to every worker holding the buckets
                # in the worker, from the rpc's start there to every bucket received
                "sync/receive_s": max(r["receive_s"] for r in results),
                "sync/install_s": max(r["install_s"] for r in results),
                "sync/rpc_s": t3 - t1,  # the whole rpc: receive, install, answer
                "sync/reset_s": t4 - t3,  # the reset's answer after the rpc's
                # 1 when every worker copied into its active slot (the fast path), 0 when
                # vLLM rebuilt the adapter (first syncs, after an eviction)
                "sync/slot_copy": float(all(r.get("path") == "slot copy" for r in results)),
                "sync/streamed": 0.0}

    def last_installs(self) -> list[dict[str, Any]]:
        """Each worker's newest streamed install (path, seconds, error, whether one is still
        pending): a streamed sync's own figures describe the one before it."""
        return self.client.collective_rpc("last_install", timeout=self.timeout_s)

    @property
    def nbytes(self) -> int:
        """Bytes one sync broadcasts (all buckets), for the mode comparison's bytes/s."""
        return sum(b.numel() * b.element_size() for b in self.buckets)

    def time_bare_broadcast(self, rounds: int = 20,
                            buckets: list[torch.Tensor] | None = None) -> list[float]:
        """Seconds per bare broadcast of the adapter's buckets (or of `buckets`, e.g. one of
        a full model's size) to the workers, no rpc and no install: the floor `sync()` is
        compared with. One warm-up round is dropped (it includes the rpc or announcement that
        makes the workers listen)."""
        buckets = self.buckets if buckets is None else buckets
        layout = {"bucket_numels": [b.numel() for b in buckets],
                  "dtypes": [DTYPE_NAMES[b.dtype] for b in buckets], "rounds": rounds + 1}
        call = None
        if self.stream is not None:  # the workers' listener receives them
            self.store.set(stream_key(self.stream, self.stream_number), json.dumps(layout))
            self.stream_number += 1
        else:
            call = self._rpc("receive_bare", **layout)
        times = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            for bucket in buckets:
                broadcast(self.group, bucket, self.timeout_s)
            times.append(time.perf_counter() - t0)
        if call is not None:
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
        group, self.group, self.store, self.stream = self.group, None, None, None
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
