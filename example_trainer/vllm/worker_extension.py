"""Worker-side half of `lora_nccl`: receive a LoRA adapter over a process group, no disk.

Loaded into every vLLM worker with
`--worker-extension-cls example_trainer.vllm.worker_extension.LoRAReceiver`; the trainer
calls the methods through `POST /collective_rpc`. The trainer is rank 0 of a *separate*
process group (its own TCPStore on a fresh port, keys prefixed per run) so vLLM's default
group is never touched.

Install path (docs/lora-slot-plan.md; vLLM's side: docs/vllm-cpu.md, "LoRA from tensors"):
the adapter name is registered once from disk through `/v1/load_lora_adapter`, which makes
the worker's `LRUCacheWorkerLoRAManager.add_adapter` load it through `_load_adapter`. We wrap
that `_load_adapter` so that, once tensors have arrived for an adapter id, it builds the
LoRA model from those tensors instead of reading the (stale) directory. A sync then only has
to drop the adapter from the model manager (`_adapter_manager.remove_adapter`) and call the
worker manager's own `add_adapter` with the remembered request: vLLM's validation, LRU
bookkeeping and slot activation all run as usual, and a later LRU reload also gets the
newest in-memory weights. After that first rebuild, `SlotPlan` copies later syncs straight
into the active slot from the buffers the broadcast wrote (kept per adapter, reused by every
sync), with one foreach copy and one foreach scale.

Runs inside vLLM's worker process; it must not import the trainer package's heavy modules.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16}


def make_group(host: str, port: int, prefix: str, rank: int, world_size: int, backend: str,
               timeout_s: float) -> Any:
    """A standalone process group (not the default one): TCPStore on `host:port` (rank 0
    hosts it), keys under `prefix` so a stale rendezvous of another run is never read.
    Blocks until every rank has joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, rank == 0, timeout, wait_for_workers=False)
    store = dist.PrefixStore(prefix, store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        opts._timeout = timeout
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)
    raise ValueError(f"unknown weight-sync backend {backend!r} (gloo or nccl)")


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


def unpack(buckets: list[torch.Tensor], specs: list[list[Any]]) -> dict[str, torch.Tensor]:
    """Split flat per-dtype buckets back into named tensors; specs are (name, shape, dtype)
    in packing order, and bucket i holds the tensors of the i-th dtype seen."""
    order = list(dict.fromkeys(dtype for _, _, dtype in specs))
    offsets = dict.fromkeys(order, 0)
    out: dict[str, torch.Tensor] = {}
    for name, shape, dtype in specs:
        bucket, start = buckets[order.index(dtype)], offsets[dtype]
        n = 1
        for d in shape:
            n *= int(d)
        out[name] = bucket[start:start + n].view(*shape)
        offsets[dtype] = start + n
    return out


class LoRAReceiver:
    """Methods injected into vLLM's worker (`self` is the worker: `self.model_runner`,
    `self.device`)."""

    def join_weight_group(self, init_method: str, rank_offset: int, world_size: int,
                          backend: str = "gloo", timeout_s: float = 60.0) -> bool:
        """Join the trainer's group; `init_method` is `tcp://host:port/prefix`. Every
        worker gets the same call, so its rank is `rank_offset` + its rank inside vLLM
        (with tensor parallelism each worker receives the full adapter and shards it)."""
        rank = rank_offset + self.rank
        address, _, prefix = init_method.removeprefix("tcp://").partition("/")
        host, _, port = address.rpartition(":")
        self._lora_sync_timeout = timeout_s
        self._lora_sync_group = make_group(host, int(port), prefix, rank, world_size, backend,
                                           timeout_s)
        self._lora_sync_backend = backend
        self._lora_sync_layout = None  # (specs, peft config): sent with a group's first sync
        self._install_memory_loader()
        log.info("joined weight-sync group %s as rank %d of %d (%s)", init_method, rank,
                 world_size, backend)
        return True

    def _install_memory_loader(self) -> None:
        """Wrap the LoRA manager's `_load_adapter` once: ids that were received over the
        group are built from the latest tensors; everything else loads from disk as usual.
        Also wrap the model manager's `activate_adapter`: a slot-copy sync updates only the
        active slot, so before vLLM copies a registered adapter into a slot again (after
        another adapter took its slot) its tensors are brought up to date from the buffers
        the last sync received into."""
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
            return _lora_from_tensors(manager, lora_id, *manager._lora_sync_tensors[lora_id],
                                      is_3d=getattr(lora_request, "is_3d_lora_weight", False))

        adapters = manager._adapter_manager
        activate = adapters.activate_adapter

        def activate_adapter(lora_id: int) -> Any:
            plan = manager._lora_sync_plans.get(lora_id)
            if (plan is not None and plan.stale and lora_id not in adapters._active_adapters
                    and adapters._registered_adapters.get(lora_id) is plan.lora_model):
                plan.refresh()  # cheap test first: this runs for every scheduled batch
            return activate(lora_id)

        manager._load_adapter = load_adapter
        adapters.activate_adapter = activate_adapter
        manager._lora_sync_wrapped = True

    def receive_adapter(self, name: str, bucket_numels: list[int],
                        dtypes: list[str] | None = None, specs: list[list[Any]] | None = None,
                        peft_config: dict[str, Any] | None = None,
                        lora_int_id: int | None = None) -> dict:
        """Receive the adapter's buckets from rank 0 and make adapter `name` use them.

        `name` must already be registered through `/v1/load_lora_adapter` (that is what
        maps the OpenAI model name to an int id). `specs` and `peft_config` come with the
        first sync over a group and are kept for the later ones. After the buckets, one
        barrier tells the trainer that they arrived (it then asks for the prefix-cache reset,
        which vLLM handles right after this rpc). Returns timings for the trainer's log."""
        t0 = time.perf_counter()
        group = getattr(self, "_lora_sync_group", None)
        if group is None:
            raise RuntimeError("receive_adapter before join_weight_group")
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
            request = manager._lora_sync_requests.get(lora_int_id)
            if request is None:
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
        plan = manager._lora_sync_plans.get(lora_int_id)
        if plan is not None and plan.usable(manager._adapter_manager, buckets):
            plan.apply()  # fast path: straight into the active slot
            path = "slot copy"
        else:
            manager._adapter_manager.remove_adapter(lora_int_id)
            # vLLM's own add path (validation, LRU, slot activation) -> wrapped
            # _load_adapter. The punica mapping is re-derived when the slot layout changes.
            manager.add_adapter(request)
            manager._lora_sync_plans[lora_int_id] = SlotPlan.build(
                manager._adapter_manager, lora_int_id, buckets)
            path = "rebuild"
        t2 = time.perf_counter()
        return {"id": lora_int_id, "receive_s": t1 - t0, "install_s": t2 - t1, "path": path}

    def receive_bare(self, bucket_numels: list[int], dtypes: list[str], rounds: int) -> bool:
        """Benchmark reference: receive `rounds` broadcasts of the adapter's buckets and
        discard them (the floor any sync over this group can reach)."""
        device = self.device if self._lora_sync_backend == "nccl" else torch.device("cpu")
        buckets = [torch.empty(n, dtype=DTYPES[d], device=device)
                   for n, d in zip(bucket_numels, dtypes)]
        for _ in range(rounds):
            for bucket in buckets:
                broadcast(self._lora_sync_group, bucket, self._lora_sync_timeout)
        return True

    def destroy_weight_group(self) -> bool:
        """Drop the group (the trainer does the same); adapters stay installed."""
        group = getattr(self, "_lora_sync_group", None)
        self._lora_sync_group = None
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


def _lora_from_tensors(manager: Any, lora_id: int, buckets: list[torch.Tensor],
                       specs: list[list[Any]], peft_config: dict[str, Any],
                       is_3d: bool = False) -> Any:
    """Build a vLLM LoRAModel the way `_load_adapter` does, but from tensors in memory."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    config = dict(peft_config, vllm_max_position_embeddings=manager.max_position_embeddings)
    helper = PEFTHelper.from_dict(config)
    helper.validate_legal(manager.lora_config)
    model = manager._adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    clones = [bucket.clone() for bucket in buckets]
    tensors = unpack(clones, specs)
    lora = LoRAModel.from_lora_tensors(
        lora_id, tensors, helper, device=str(buckets[0].device),
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    lora.is_3d_lora_weight = is_3d
    lora._lora_sync_clones = clones  # its tensors are views of these (see SlotPlan.build)
    # the factor vLLM folds into lora_b: SlotPlan.build tries it first
    lora._lora_sync_scaling = getattr(helper, "vllm_lora_scaling_factor", None)
    return lora


class SlotPlan:
    """Where each received tensor lives in vLLM's active LoRA slot, so later syncs copy
    straight from the receive buffers into the slot instead of rebuilding and re-activating
    the adapter (~20 ms for SmolLM2 on CPU, 3x the broadcast itself).

    Learned from vLLM's own install rather than from its layouts: the LoRA model built from
    our bucket clones keeps views of them (scaled in place for lora_b), so each tensor the
    slot was filled from can be traced back to an offset in a bucket, and the plan verifies
    that the slot holds exactly those values, that the scale reproduces them bit for bit,
    and that every received element is used. If anything doesn't trace (another vLLM
    version, tensor parallel slicing, a dtype change, lora_b still all zero so its scale
    can't be checked), there is no plan and every sync takes vLLM's path.

    A sync writes the slot only (`apply`): the registered model's own tensors, which vLLM
    copies from when it activates the adapter again, are brought up to date (`refresh`)
    only when that happens (the wrapped `activate_adapter`)."""

    def __init__(self, lora_model: Any, slot: int, lora_id: int, received: list[torch.Tensor],
                 entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> None:
        self.lora_model, self.slot, self.lora_id = lora_model, slot, lora_id
        self.received = received  # the receive buffers the entries' raw views point into
        self.entries = entries  # (slot view, model's tensor, raw view, scale)
        self.views = [view for view, _, _, _ in entries]
        self.sources = [raw for _, _, raw, _ in entries]
        self.scaled: dict[float, list[torch.Tensor]] = {}  # scale -> slot views to scale
        for view, _, _, scale in entries:
            if scale != 1.0:
                self.scaled.setdefault(scale, []).append(view)
        self.stale = False  # the model's tensors lag the slot (refresh before re-activation)

    @classmethod
    def build(cls, adapters: Any, lora_id: int, received: list[torch.Tensor]
              ) -> "SlotPlan | None":
        lora_model = adapters._registered_adapters.get(lora_id)
        clones = getattr(lora_model, "_lora_sync_clones", None)
        if clones is None or lora_id not in adapters.lora_index_to_id:
            return None
        slot = adapters.lora_index_to_id.index(lora_id)
        storages = {c.untyped_storage().data_ptr(): i for i, c in enumerate(clones)}
        hint = getattr(lora_model, "_lora_sync_scaling", None)
        entries, covered = [], 0
        for name, module in adapters.modules.items():
            weights = lora_model.get_lora(name)
            if weights is None:
                continue
            if getattr(module, "tp_size", 1) != 1 or not hasattr(module, "lora_a_stacked"):
                return None
            for kind, tensors in (("a", weights.lora_a), ("b", weights.lora_b)):
                stacked = module.lora_a_stacked if kind == "a" else module.lora_b_stacked
                tensors = tensors if isinstance(tensors, list) else [tensors]
                if len(tensors) != len(stacked):
                    return None
                for part, tensor in zip(stacked, tensors):
                    if tensor is None:
                        continue
                    bucket = storages.get(tensor.untyped_storage().data_ptr())
                    if bucket is None or not tensor.is_contiguous() or tensor.dim() != 2:
                        return None
                    view = part[slot, 0, :tensor.shape[0], :tensor.shape[1]]
                    offset = tensor.storage_offset()
                    raw = received[bucket][offset:offset + tensor.numel()].view(tensor.shape)
                    scale = 1.0 if kind == "a" else scale_of(tensor, raw, hint)
                    if scale is None or not torch.equal(view, tensor) or (
                            scale == 1.0 and not torch.equal(raw, tensor)):
                        return None
                    entries.append((view, tensor, raw, scale))
                    covered += tensor.numel()
        if covered != sum(b.numel() for b in received):
            return None
        return cls(lora_model, slot, lora_id, received, entries)

    def usable(self, adapters: Any, received: list[torch.Tensor]) -> bool:
        """The same model object still sits in the same slot (no eviction or reload), and
        this sync received into the buffers the plan reads."""
        return (adapters._registered_adapters.get(self.lora_id) is self.lora_model
                and self.slot < len(adapters.lora_index_to_id)
                and adapters.lora_index_to_id[self.slot] == self.lora_id
                and len(received) == len(self.received)
                and all(a is b for a, b in zip(received, self.received)))

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the received tensors into the active slot and scale the lora_b parts (one
        foreach copy, one foreach scale per distinct scale). Runs inside the rpc, between
        engine steps."""
        torch._foreach_copy_(self.views, self.sources)
        for scale, views in self.scaled.items():
            torch._foreach_mul_(views, scale)
        self.stale = True

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring the registered model's tensors up to the last received values."""
        for _, tensor, raw, scale in self.entries:
            if scale == 1.0:
                tensor.copy_(raw)
            else:
                torch.mul(raw, scale, out=tensor)
        self.stale = False


def scale_of(scaled: torch.Tensor, raw: torch.Tensor, hint: float | None = None
             ) -> float | None:
    """The factor vLLM folded into lora_b (alpha / r, or a per-module pattern): `hint`
    (vLLM's own factor) or the ratio read off the two copies, whichever reproduces `scaled`
    exactly from `raw` by one multiplication; None when raw is all zero (a fresh adapter:
    nothing to check a factor against) or no factor is exact."""
    magnitude = raw.abs()
    if magnitude.max() == 0:
        return None
    index = int(magnitude.argmax())
    candidates = [] if hint is None else [float(hint)]
    candidates.append(float(scaled.reshape(-1)[index] / raw.reshape(-1)[index]))
    for scale in candidates:
        if torch.equal(torch.mul(raw, scale), scaled):
            return scale
    return None
