"""Worker-side half of `lora_nccl`: receive a LoRA adapter over a process group, no disk.

Loaded into every vLLM worker with
`--worker-extension-cls example_trainer.vllm.worker_extension.LoRAReceiver`; the trainer
calls the methods through `POST /collective_rpc`. The trainer is rank 0 of a *separate*
process group (its own TCPStore on a fresh port, keys prefixed per run) so vLLM's default
group is never touched.

A group's first sync is one rpc (`receive_adapter`): it carries the adapter's layout,
receives, and installs through vLLM's own path, fed from memory (`lora_slot.py`). From then
on the worker listens in a thread (`AdapterStream`): the trainer announces a sync in the
group's store; the listener takes the lock the engine's next step waits for (in the wrapped
`set_active_adapters`, before any forward pass) and meets the trainer at a barrier, then
receives; that next step installs the buckets. No rpc, so no HTTP and engine-loop round
trip per sync, and the trainer's prefix-cache reset overlaps the broadcast
(docs/lora-slot-plan.md).

Runs inside vLLM's worker process; it must not import the trainer package's heavy modules.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from .lora_slot import install, lora_from_tensors

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16}
# How long the listening thread waits on the store before it waits again (a timeout logs a
# warning in torch, so rarely; the trainer wakes it with a "stop" to end it).
LISTEN_WAIT = datetime.timedelta(minutes=30)


def open_group(host: str, port: int, prefix: str, rank: int, world_size: int, backend: str,
               timeout_s: float) -> tuple[Any, Any]:
    """A standalone process group (not the default one) and its store: TCPStore on
    `host:port` (rank 0 hosts it), keys under `prefix` so a stale rendezvous of another run
    is never read. Blocks until every rank has joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout, wait_for_workers=False)
    store = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        opts._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, world_size, opts), store
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts), store
    raise ValueError(f"unknown weight-sync backend {backend!r} (gloo or nccl)")


def connect_store(host: str, port: int, prefix: str, timeout_s: float) -> Any:
    """One more client connection to a group's store (see `open_group`)."""
    store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(prefix, store)


def make_group(host: str, port: int, prefix: str, rank: int, world_size: int, backend: str,
               timeout_s: float) -> Any:
    """`open_group` without the store."""
    return open_group(host, port, prefix, rank, world_size, backend, timeout_s)[0]


def broadcast(group: Any, tensor: torch.Tensor, timeout_s: float) -> None:
    """Broadcast from rank 0 in `group` and wait (a lost peer raises after the timeout)."""
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    opts.timeout = datetime.timedelta(seconds=timeout_s)
    group.broadcast([tensor], opts).wait()


def barrier(group: Any, device: torch.device, timeout_s: float) -> None:
    """A one-element all-reduce: returns once every rank reached it. After the adapter's
    buckets it tells the trainer that every worker holds them, so its `receive_adapter`
    rpc is running inside vLLM's engine loop and a request sent now is handled after it."""
    opts = dist.AllreduceOptions()
    opts.timeout = datetime.timedelta(seconds=timeout_s)
    group.allreduce([torch.zeros(1, device=device)], opts).wait()


def exchange_max(group: Any, values: list[float], device: torch.device,
                 timeout_s: float) -> list[float]:
    """An all-reduce (MAX) of a few numbers: a barrier that also brings back figures."""
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    opts.timeout = datetime.timedelta(seconds=timeout_s)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    group.allreduce([tensor], opts).wait()
    return tensor.tolist()


def receive_and_drop(group: Any, bucket_numels: list[int], dtypes: list[str],
                     device: torch.device, rounds: int, timeout_s: float) -> None:
    """Receive `rounds` broadcasts of buckets of these sizes into scratch buffers: the floor
    any sync over the group can reach (the bare-broadcast benchmark)."""
    scratch = [torch.empty(n, dtype=DTYPES[d], device=device)
               for n, d in zip(bucket_numels, dtypes)]
    for _ in range(rounds):
        for bucket in scratch:
            broadcast(group, bucket, timeout_s)


def stream_key(session: str, number: int) -> str:
    """The store key of announcement `number` of `session`: "sync", "stop" (the listener's
    end) or a bare-broadcast benchmark (JSON: bucket_numels, dtypes, rounds)."""
    return f"stream/{session}/{number}"


class AdapterStream:
    """A worker thread that receives one adapter's later syncs without an rpc; the engine
    thread installs each at its next step (`install_pending`). The lock keeps a receive from
    writing the buckets while the engine thread reads them."""

    def __init__(self, worker: Any, session: str, lora_id: int, buckets: list[torch.Tensor],
                 first_install: dict[str, Any]) -> None:
        self.worker, self.session, self.lora_id, self.buckets = worker, session, lora_id, buckets
        # Its own store connection: a TCPStore client serialises its calls, so a `set` (the
        # rpc thread's "stop") would wait behind the listener's blocking `wait` on a shared one.
        self.group, self.store = worker._lora_sync_group, connect_store(*worker._lora_sync_address)
        self.waker = worker._lora_sync_store
        self.timeout_s, self.device = worker._lora_sync_timeout, buckets[0].device
        self.lock = threading.Lock()
        self.pending = False
        self.last_install = first_install  # reported with the first streamed sync
        self.last_receive_s = first_install.pop("receive_s")
        self.number = 0
        self.thread = threading.Thread(target=self._listen, name="lora-sync-listener",
                                       daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while True:
            key = stream_key(self.session, self.number)
            try:
                self.store.wait([key], LISTEN_WAIT)
                announcement = self.store.get(key)
                if announcement == b"stop":
                    return
                if announcement == b"sync":
                    self._receive()
                else:
                    self._receive_bare(**json.loads(announcement))
            except dist.DistStoreError as exc:
                if "timeout" in str(exc):
                    continue  # a long pause between syncs
                log.info("weight-sync listener ends: the trainer's store is gone (%s)", exc)
                return
            except RuntimeError as exc:  # gloo/NCCL: the trainer went away mid-sync
                log.error("weight-sync listener ends: receiving a sync failed: %s", exc)
                return
            self.number += 1

    def _receive(self) -> None:
        """Take the lock, then meet the trainer at a barrier (which carries the last receive's
        and install's figures): from there on the engine's next step waits here, so the
        trainer's prefix-cache reset can run alongside the broadcast. Then receive."""
        with self.lock:
            last = self.last_install
            exchange_max(self.group, [float(bool(last["error"])), self.last_receive_s,
                                      last["install_s"], float(last["path"] != "slot copy")],
                         self.device, self.timeout_s)
            start = time.perf_counter()
            for bucket in self.buckets:
                broadcast(self.group, bucket, self.timeout_s)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.last_receive_s = time.perf_counter() - start
            self.pending = True

    def _receive_bare(self, bucket_numels: list[int], dtypes: list[str], rounds: int) -> None:
        """Benchmark reference (`AdapterBroadcaster.time_bare_broadcast`)."""
        receive_and_drop(self.group, bucket_numels, dtypes, self.device, rounds, self.timeout_s)

    def install_pending(self) -> None:
        """In the engine thread, holding `lock`, before a step's forward pass: install what
        arrived. A failure is logged and reported to the trainer at its next sync, not
        raised (that would kill the engine)."""
        if not self.pending:
            return
        start = time.perf_counter()
        try:
            path, error = install(self.worker.model_runner.lora_manager, self.lora_id,
                                  self.buckets), ""
        except Exception as exc:  # noqa: BLE001 - reported, see above
            log.exception("installing a received adapter failed")
            path, error = "failed", f"{type(exc).__name__}: {exc}"
        self.last_install = {"path": path, "install_s": time.perf_counter() - start,
                             "error": error}
        self.pending = False

    def stop(self) -> None:
        """End the listener (it may be waiting on the store: wake it) and install what it
        received, so an rpc can use the group next."""
        if self.thread.is_alive():
            try:  # the key it waits on, or the next one if it is just receiving
                for number in (self.number, self.number + 1):
                    self.waker.set(stream_key(self.session, number), "stop")
            except RuntimeError:  # the store's host (the trainer) is gone: so is the listener
                pass
            self.thread.join(self.timeout_s)
        with self.lock:
            self.install_pending()


class LoRAReceiver:
    """Methods injected into vLLM's worker (`self` is the worker: `self.model_runner`,
    `self.device`)."""

    def join_weight_group(self, init_method: str, rank_offset: int, world_size: int,
                          backend: str = "gloo", timeout_s: float = 60.0) -> bool:
        """Join the trainer's group; `init_method` is `tcp://host:port/prefix`. Every
        worker gets the same call, so its rank is `rank_offset` + its rank inside vLLM
        (with tensor parallelism each worker receives the full adapter and shards it)."""
        self._stop_stream()
        rank = rank_offset + self.rank
        address, _, prefix = init_method.removeprefix("tcp://").partition("/")
        host, _, port = address.rpartition(":")
        self._lora_sync_timeout = timeout_s
        self._lora_sync_group, self._lora_sync_store = open_group(
            host, int(port), prefix, rank, world_size, backend, timeout_s)
        self._lora_sync_backend = backend
        self._lora_sync_address = (host, int(port), prefix, timeout_s)
        self._lora_sync_layout = None  # (specs, peft config): sent with a group's first sync
        self._install_memory_loader()
        log.info("joined weight-sync group %s as rank %d of %d (%s)", init_method, rank,
                 world_size, backend)
        return True

    def _install_memory_loader(self) -> None:
        """Wrap, once, the LoRA manager's `_load_adapter` (ids received over the group are
        built from the latest tensors; everything else loads from disk as usual), the model
        manager's `activate_adapter` (before vLLM copies an adapter into a slot again, its
        tensors are brought up to date from the buffers the last sync received into: a slot
        copy updates only the active slot) and `set_active_adapters`, which the model runner
        calls before every forward pass: a streamed sync is installed there."""
        manager = self.model_runner.lora_manager
        if getattr(manager, "_lora_sync_wrapped", False):
            return
        original = manager._load_adapter
        manager._lora_sync_tensors = {}  # lora_int_id -> (buckets, specs, peft config)
        manager._lora_sync_requests = {}  # lora_int_id -> the request vLLM registered
        manager._lora_sync_plans = {}  # lora_int_id -> SlotPlan (None: rebuild every sync)

        def load_adapter(lora_request: Any) -> Any:
            lora_id = lora_request.lora_int_id
            manager._lora_sync_requests[lora_id] = lora_request
            if lora_id not in manager._lora_sync_tensors:
                return original(lora_request)
            return lora_from_tensors(manager, lora_id, *manager._lora_sync_tensors[lora_id],
                                     is_3d=getattr(lora_request, "is_3d_lora_weight", False))

        adapters = manager._adapter_manager
        activate = adapters.activate_adapter

        def activate_adapter(lora_id: int) -> Any:
            plan = manager._lora_sync_plans.get(lora_id)
            if (plan is not None and plan.stale and lora_id not in adapters._active_adapters
                    and adapters._registered_adapters.get(lora_id) is plan.lora_model):
                plan.refresh()  # cheap test first: this runs for every scheduled batch
            return activate(lora_id)

        set_active = manager.set_active_adapters

        def set_active_adapters(requests: Any, mapping: Any) -> Any:
            stream = getattr(self, "_lora_stream", None)
            if stream is None:
                return set_active(requests, mapping)
            # Locked: a receive must not write the buffers that an install, a refresh on
            # re-activation or a reload after eviction (all in here) read.
            with stream.lock:
                stream.install_pending()
                return set_active(requests, mapping)

        manager._load_adapter = load_adapter
        adapters.activate_adapter = activate_adapter
        manager.set_active_adapters = set_active_adapters
        manager._lora_sync_wrapped = True

    def _stop_stream(self) -> None:
        stream, self._lora_stream = getattr(self, "_lora_stream", None), None
        if stream is not None:
            stream.stop()

    def receive_adapter(self, name: str, bucket_numels: list[int],
                        dtypes: list[str] | None = None, specs: list[list[Any]] | None = None,
                        peft_config: dict[str, Any] | None = None,
                        lora_int_id: int | None = None,
                        stream_session: str | None = None) -> dict:
        """Receive the adapter's buckets from rank 0 and make adapter `name` use them.

        `name` must already be registered through `/v1/load_lora_adapter` (that is what
        maps the OpenAI model name to an int id). `specs` and `peft_config` come with the
        first sync over a group and are kept for the later ones. After the buckets, one
        barrier tells the trainer that they arrived (it then asks for the prefix-cache reset,
        which vLLM handles right after this rpc). With `stream_session`, later syncs are
        then received by an `AdapterStream`. Returns timings for the trainer's log."""
        t0 = time.perf_counter()
        group = getattr(self, "_lora_sync_group", None)
        if group is None:
            raise RuntimeError("receive_adapter before join_weight_group")
        self._stop_stream()
        device = self.device if self._lora_sync_backend == "nccl" else torch.device("cpu")
        manager = self.model_runner.lora_manager
        problem: Exception | None = None
        try:  # whatever fails here, take part in the collectives: the trainer waits on them
            if specs is not None:
                self._lora_sync_layout = (specs, dict(peft_config or {}))
            if self._lora_sync_layout is None:
                raise RuntimeError("receive_adapter without specs before any sync over this "
                                   "group")
            specs, peft_config = self._lora_sync_layout
            dtypes = dtypes or list(dict.fromkeys(dtype for _, _, dtype in specs))
            if lora_int_id is None:
                lora_int_id = _registered_id(manager, name)
            if lora_int_id not in manager._lora_sync_requests:
                raise RuntimeError(f"adapter {name!r} (id {lora_int_id}) was never loaded by "
                                   "this worker: register it with /v1/load_lora_adapter first")
            buckets = _receive_buffers(manager._lora_sync_tensors.get(lora_int_id),
                                       bucket_numels, dtypes, device)
        except Exception as exc:
            problem = exc
            buckets = [torch.empty(n, dtype=DTYPES[d], device=device)
                       for n, d in zip(bucket_numels, dtypes or ["float32"] * len(bucket_numels))]
        for bucket in buckets:
            broadcast(group, bucket, self._lora_sync_timeout)
        barrier(group, device, self._lora_sync_timeout)
        if problem is not None:
            raise problem
        t1 = time.perf_counter()
        # The buckets are kept (and received into again next time). A rebuild clones them,
        # because the manager's optimize() scales lora_b in place.
        manager._lora_sync_tensors[lora_int_id] = (buckets, specs, peft_config)
        path = install(manager, lora_int_id, buckets)
        t2 = time.perf_counter()
        if stream_session is not None:
            self._lora_stream = AdapterStream(self, stream_session, lora_int_id, buckets, {
                "path": path, "install_s": t2 - t1, "error": "", "receive_s": t1 - t0})
        return {"id": lora_int_id, "receive_s": t1 - t0, "install_s": t2 - t1, "path": path,
                "streaming": stream_session is not None}

    def last_install(self) -> dict:
        """How the newest streamed sync was installed (path, seconds, error); {} when no
        listener runs."""
        stream = getattr(self, "_lora_stream", None)
        return {} if stream is None else dict(stream.last_install, pending=stream.pending)

    def receive_bare(self, bucket_numels: list[int], dtypes: list[str], rounds: int) -> bool:
        """Benchmark reference: receive `rounds` broadcasts of the adapter's buckets and
        discard them (the floor any sync over this group can reach)."""
        self._stop_stream()
        device = self.device if self._lora_sync_backend == "nccl" else torch.device("cpu")
        receive_and_drop(self._lora_sync_group, bucket_numels, dtypes, device, rounds,
                         self._lora_sync_timeout)
        return True

    def destroy_weight_group(self) -> bool:
        """Drop the group (the trainer does the same); adapters stay installed."""
        self._stop_stream()
        group = getattr(self, "_lora_sync_group", None)
        self._lora_sync_group = self._lora_sync_store = None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except RuntimeError as exc:  # a peer already gone: nothing left to coordinate
                log.warning("weight-sync group shutdown: %s", exc)
        return group is not None


def _receive_buffers(kept: tuple | None, numels: list[int], dtypes: list[str],
                     device: torch.device) -> list[torch.Tensor]:
    """The buffers the last sync of this adapter received into, when they fit (so the slot
    plan's views of them stay valid and no fresh pages are touched); new ones otherwise."""
    if kept is not None:
        buckets = kept[0]
        if [(b.numel(), b.dtype, b.device) for b in buckets] == [
                (n, DTYPES[d], device) for n, d in zip(numels, dtypes)]:
            return buckets
    return [torch.empty(n, dtype=DTYPES[d], device=device) for n, d in zip(numels, dtypes)]


def _registered_id(manager: Any, name: str) -> int:
    """The int id vLLM gave adapter `name` (seen when `/v1/load_lora_adapter` loaded it)."""
    ids = [i for i, r in manager._lora_sync_requests.items() if r.lora_name == name]
    if len(ids) != 1:
        raise RuntimeError(f"adapter {name!r} is not (uniquely) registered in this worker: "
                           f"{ids}; pass lora_int_id")
    return ids[0]
