"""Trainer-side half of `full_nccl`: send every parameter to vLLM through its weight-transfer
API, in packed buckets over a process group, no disk.

vLLM's API (dev mode): `/init_weight_transfer_engine` (join a group with the trainer),
then per sync `/start_weight_update`, `/update_weights` (the workers receive while the
trainer broadcasts), `/finish_weight_update`. The engine behind it comes from the server's
`--weight-transfer-config`:

- CPU: `example_gloo`, this project's engine (`example_trainer/vllm/gloo_engine.py`,
  registered in vLLM by the `vllm.general_plugins` entry point, here by `plugin.register`);
  `GlooTrainerWeightTransferEngine` below is its trainer side, registered in vLLM's
  `WeightTransferTrainerFactory` under the same name.
- CUDA: vLLM's own `nccl` engine (packed, `--sync-bucket-mib` buffers). Written, not run
  in CI (no vLLM on the GPU check machine).

No silent hang: every wait has a timeout (`--sync-timeout`) and fails with one line naming
the side that stopped answering. The HTTP calls that wait for a collective run in a thread
(`BackgroundCall`) while the trainer does its half with a timed broadcast, so the trainer is
never left blocked in a collective. Memory: the trainer packs one bucket at a time from its own
parameters (through a `WeightSource`, so a sharded trainer can gather tensor by tensor); a
tensor larger than a bucket is sent from its own memory. A sync holds at most one bucket
more than the trainer holds between syncs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Self

import torch

from vllm.distributed.weight_transfer.base import (ModuleSource, ParamMeta, TrainerInitInfo,
                                                   TrainerWeightTransferEngine, WeightSource)

from .distributed import full_tensor
from .step import model_device
from .vllm.client import VLLMClient
from .vllm.gloo_engine import GlooInitInfo, as_bytes, plan_buckets
from .vllm.plugin import BACKEND, register
from .vllm.server import free_port
from .vllm.worker_extension import broadcast, make_group
from .weight_sync import BackgroundCall, WeightSyncError, resolve_backend

log = logging.getLogger(__name__)

RPC_SLACK_S = 30.0  # on top of --sync-timeout for an HTTP call that waits on a collective


class HTTPWeightSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over the project's HTTP client, each call with
    a timeout (vLLM's own HTTP client has one fixed timeout for all)."""

    def __init__(self, client: VLLMClient, timeout_s: float) -> None:
        self.client, self.timeout_s = client, timeout_s

    def _post(self, path: str, body: dict[str, Any] | None, timeout: float) -> None:
        self.client.post(path, body, timeout=timeout)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._post("/init_weight_transfer_engine", {"init_info": init_info},
                   self.timeout_s + RPC_SLACK_S)

    def start_weight_update(self) -> None:
        self._post("/start_weight_update", None, self.timeout_s)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # Bounded by the trainer's own timed broadcasts and the join in send_weights; a
        # large model legitimately takes longer than one --sync-timeout in total.
        self._post("/update_weights", {"update_info": update_info}, self.client.timeout)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        body = None if weight_version is None else {"weight_version": weight_version}
        self._post("/finish_weight_update", body, self.timeout_s)

    def shutdown_weight_transfer_engine(self) -> None:
        self._post("/shutdown_weight_transfer_engine", None, min(30.0, self.timeout_s))


def send_buckets(pairs: Iterable[tuple[str, torch.Tensor]], meta: list[ParamMeta],
                 bucket_bytes: int, send: Callable[[torch.Tensor], None]) -> int:
    """Pack `pairs` (in `meta` order) into byte buckets of at most `bucket_bytes` and
    `send` each one; returns the number of buckets. One bucket buffer is reused (each send
    completes before the next pack); a tensor larger than a bucket is sent from its own
    memory (a CPU copy only if it is not contiguous or not on the CPU)."""
    sizes = [_nbytes(m) for m in meta]
    plans = plan_buckets(sizes, bucket_bytes)
    packed = [p.nbytes for p in plans if not p.direct]
    buffer = torch.empty(max(packed, default=0), dtype=torch.uint8)
    it = iter(pairs)
    for plan in plans:
        if plan.direct:
            (index, _), = plan.entries
            tensor = _checked(next(it, None), meta, index)
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                tensor = tensor.detach().to("cpu").contiguous()
            send(as_bytes(tensor))
            continue
        bucket = buffer[:plan.nbytes]
        for index, offset in plan.entries:
            data = _checked(next(it, None), meta, index).detach()
            bucket[offset:offset + sizes[index]].view(data.dtype).view(data.shape).copy_(data)
        send(bucket)
    if next(it, None) is not None:
        raise ValueError(f"the weight source yields more tensors than its {len(meta)} "
                         "declared in metadata()")
    return len(plans)


def _nbytes(meta: ParamMeta) -> int:
    n = 1
    for d in meta.shape:
        n *= int(d)
    return n * torch.empty((), dtype=meta.dtype).element_size()


def _checked(pair: tuple[str, torch.Tensor] | None, meta: list[ParamMeta], index: int
             ) -> torch.Tensor:
    """The worker sized its buckets from `meta`: a source that disagrees must fail here,
    not hang or load garbage there."""
    expected = meta[index]
    if pair is None:
        raise ValueError(f"the weight source ended before {expected.name!r}")
    name, tensor = pair
    if (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype,
                                                      tuple(expected.shape)):
        raise ValueError(f"the weight source yielded {name!r} {tensor.dtype} "
                         f"{tuple(tensor.shape)} where metadata() declared {expected.name!r} "
                         f"{expected.dtype} {tuple(expected.shape)}")
    return tensor


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info of `example_gloo`; the wire params go to the workers."""

    backend: ClassVar[str] = BACKEND

    master_address: str
    master_port: int
    world_size: int
    bucket_bytes: int
    timeout_s: float = 120.0
    load: str = "auto"  # the workers' way to load: "auto" (in place) or "layerwise"


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Rank 0 of a gloo group with vLLM's workers; drives start/update/finish over HTTP."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: Any, source: WeightSource, bucket_bytes: int,
                 timeout_s: float, is_sender: bool = True) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.group: Any = None
        self.stats: dict[str, float] = {}

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: Any,
                     source: WeightSource | None = None) -> Self:
        if source is None:
            raise ValueError(f"{BACKEND} sends full weights: it needs a WeightSource")
        engine = cls(client=client, source=source, bucket_bytes=init_info.bucket_bytes,
                     timeout_s=init_info.timeout_s, is_sender=init_info.is_sender)
        if not engine.is_sender:  # another data-parallel rank: it only helps gather
            return engine
        prefix = f"{BACKEND}-{uuid.uuid4().hex}"  # a stale store of another run can't match
        worker_info = GlooInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port,
            rank_offset=1, world_size=init_info.world_size,
            bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s,
            store_prefix=prefix, load=init_info.load)
        call = BackgroundCall(lambda: client.init_weight_transfer_engine(asdict(worker_info)),
                              "/init_weight_transfer_engine")
        try:
            engine.group = make_group(init_info.master_address, init_info.master_port, prefix,
                                      0, init_info.world_size, "gloo", init_info.timeout_s)
        except RuntimeError as exc:
            if call.failed:  # vLLM refused (e.g. no --weight-transfer-config)
                call.join(0)
            raise WeightSyncError(f"vLLM's workers did not join the weight-transfer group "
                                  f"within --sync-timeout {init_info.timeout_s:.0f} s: "
                                  f"{exc}") from exc
        call.join(init_info.timeout_s + RPC_SLACK_S)
        return engine

    def send_weights(self) -> None:
        """One full sync: start, the buckets (worker receives concurrently), finish. A rank
        other than 0 runs only its part of the gathers, in the same order as rank 0."""
        assert self.source is not None
        if not self.is_sender:
            for _ in self.source:  # RankDeviceSource: one gather per sharded parameter
                pass
            return
        assert self.group is not None
        meta = self.source.metadata()
        t0 = time.perf_counter()
        _answer(self.client.start_weight_update, "/start_weight_update", self.timeout_s)
        t1 = time.perf_counter()
        update = {"names": [m.name for m in meta],
                  "dtype_names": [str(m.dtype).removeprefix("torch.") for m in meta],
                  "shapes": [list(m.shape) for m in meta]}
        call = BackgroundCall(lambda: self.client.update_weights(update), "/update_weights")

        def send(bucket: torch.Tensor) -> None:
            if call.failed:  # the worker refused: don't wait for its broadcast
                call.join(0)
            try:
                broadcast(self.group, bucket, self.timeout_s)
            except RuntimeError as exc:
                raise WeightSyncError(f"vLLM's workers stopped receiving weights within "
                                      f"--sync-timeout {self.timeout_s:.0f} s ({exc}). Is "
                                      "vLLM still running? See its log.") from exc

        buckets = send_buckets(self.source, meta, self.bucket_bytes, send)
        call.join(self.timeout_s + RPC_SLACK_S)  # the last bucket's load
        t2 = time.perf_counter()
        _answer(self.client.finish_weight_update, "/finish_weight_update", self.timeout_s)
        t3 = time.perf_counter()
        self.stats = {"sync/start_s": t1 - t0, "sync/send_s": t2 - t1,
                      "sync/finish_s": t3 - t2, "sync/buckets": float(buckets),
                      "sync/bytes": float(sum(_nbytes(m) for m in meta))}

    def shutdown(self) -> None:
        group, self.group = self.group, None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except RuntimeError as exc:
                log.warning("weight-transfer group shutdown: %s", exc)


class RankDeviceSource(ModuleSource):
    """vLLM's ModuleSource, gathering each sharded parameter on the rank's device: under
    FSDP2's CPU offload (`--optimizer adamw_cpu`) the shards sit in CPU memory, and NCCL
    gathers only device memory."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__(module)
        self.module = module
        # Iterated in the sender's thread, where a bare "cuda" would mean cuda:0.
        self.device = model_device(module)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.module.named_parameters():
            yield name, full_tensor(param, self.device)


def _answer(fn: Callable[[], Any], what: str, timeout_s: float) -> Any:
    """A control-plane call in a thread, so even a server that accepts the connection and
    never answers fails after the timeout."""
    return BackgroundCall(fn, what).join(timeout_s + RPC_SLACK_S)


class FullWeightSender:
    """One trainer's weight-transfer connection to vLLM: `join()` at start and after a
    restart, `sync()` per sync, `close()` on exit (or `abandon()` for a dead server)."""

    def __init__(self, client: VLLMClient, model: torch.nn.Module, *, bucket_mib: float,
                 timeout_s: float, workers: int = 1, backend: str = "auto",
                 host: str = "127.0.0.1", load: str = "auto") -> None:
        """`load` (gloo only): "auto" has vLLM's workers load in place where the model
        allows it, "layerwise" forces vLLM's layerwise reload (benchmarks compare them)."""
        self.client, self.model, self.timeout_s = client, model, timeout_s
        self.load = load
        self.bucket_bytes = max(1, int(bucket_mib * 2**20))
        self.world_size, self.host = 1 + workers, host
        data_parallel = getattr(model, "data_parallel", None)  # FSDP2 under torchrun
        self.rank = 0 if data_parallel is None else data_parallel.rank  # rank 0 sends
        # The rank's device: the shards may sit in CPU memory (adamw_cpu).
        self.backend = resolve_backend(backend, model_device(model))
        self.http = HTTPWeightSyncClient(client, timeout_s)
        self.engine: Any = None
        self.broken = False

    def join(self) -> None:
        """Rendezvous with vLLM's workers on a fresh port."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        register()
        port = free_port(self.host)
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
            info: TrainerInitInfo = NCCLTrainerInitInfo(
                master_address=self.host, master_port=port, world_size=self.world_size,
                packed=True, packed_buffer_size_bytes=self.bucket_bytes, rank=self.rank)
            # vLLM's NCCL rendezvous has no timeout of its own: bound it here
            self.engine = BackgroundCall(lambda: WeightTransferTrainerFactory.trainer_init(
                info, client=self.http, source=RankDeviceSource(self.model)),
                "the NCCL weight-transfer rendezvous").join(self.timeout_s + RPC_SLACK_S)
        else:
            info = GlooTrainerInitInfo(master_address=self.host, master_port=port,
                                       world_size=self.world_size,
                                       bucket_bytes=self.bucket_bytes,
                                       timeout_s=self.timeout_s, load=self.load, rank=self.rank)
            self.engine = WeightTransferTrainerFactory.trainer_init(
                info, client=self.http, source=RankDeviceSource(self.model))
        self.broken = False
        log.info("weight-transfer group up: %s:%d, %s, %.2f MiB buckets", self.host, port,
                 self.backend, self.bucket_bytes / 2**20)

    @torch.no_grad()
    def sync(self) -> dict[str, float]:
        """Send every parameter; vLLM serves them from the finish on."""
        if self.engine is None:
            raise WeightSyncError("sync before join()")
        t0 = time.perf_counter()
        try:
            if self.backend == "nccl":  # vLLM's NCCL engine waits without a timeout
                BackgroundCall(self.engine.send_weights, "the NCCL weight transfer").join(
                    self.timeout_s + RPC_SLACK_S)
            else:
                self.engine.send_weights()
        except BaseException:
            self.broken = True
            raise
        stats = dict(getattr(self.engine, "stats", {}))
        stats["sync/transfer_s"] = time.perf_counter() - t0
        return stats

    def abandon(self) -> None:
        """Drop the group without telling the workers: they died with their server."""
        self.broken = True
        self.close()

    def close(self) -> None:
        """Best effort, on exit (possibly after a failure; must not hide it): the workers
        leave the group, then we do."""
        engine, self.engine = self.engine, None
        if engine is None:
            return
        if not self.broken and self.client.health():
            try:
                _answer(self.http.shutdown_weight_transfer_engine,
                        "/shutdown_weight_transfer_engine", min(30.0, self.timeout_s))
            except Exception as exc:  # noqa: BLE001 - tear-down must not mask the cause
                log.warning("weight-transfer tear-down: %s", exc)
        engine.shutdown()


@contextlib.contextmanager
def generation_paused(client: VLLMClient, how: str) -> Iterator[None]:
    """Around a full update. Between `/start_weight_update` and `/finish_weight_update`
    (separate calls, each between engine steps) vLLM's model is half updated (in place on
    CPU: embeddings and norms new, linears still on their old packed copies; layerwise:
    layers empty), so no engine step may run in between, whatever `--sync-pause` says: 'wait'
    drains running requests first; 'none' only freezes them (`/pause?mode=keep`, tens of
    ms) for the update, and the prefix-cache reset then preempts them, so vLLM recomputes
    them under the new weights (as lora_nccl's 'none' does)."""
    if how == "wait":
        with client.paused("wait"):
            yield
        return
    if how != "none":
        raise ValueError(f"unknown sync pause {how!r} (expected 'wait' or 'none')")
    client.pause("keep")
    try:
        yield
    finally:
        client.resume()


def weight_transfer_options(cfg: Any) -> dict[str, Any]:
    """vLLM start options for full_nccl: the engine its workers build."""
    backend = "nccl" if torch.cuda.is_available() else BACKEND
    return {"extra_args": ["--weight-transfer-config", json.dumps({"backend": backend})]}

