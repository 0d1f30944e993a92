"""vLLM's side of a `lora_nccl` install, kept apart from the receiving: building a LoRA model
from received tensors, and the slot plan that copies later syncs straight into vLLM's active
LoRA slot (docs/lora-slot-plan.md).

Runs inside vLLM's worker process; it must not import the trainer package's heavy modules.
"""

from __future__ import annotations

from typing import Any

import torch


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


def lora_from_tensors(manager: Any, lora_id: int, buckets: list[torch.Tensor],
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

    def _still_ours(self, adapters: Any, received: list[torch.Tensor]) -> bool:
        """The same model object is still registered (no eviction or reload), and this sync
        received into the buffers the plan reads."""
        return (adapters._registered_adapters.get(self.lora_id) is self.lora_model
                and len(received) == len(self.received)
                and all(a is b for a, b in zip(received, self.received)))

    def usable(self, adapters: Any, received: list[torch.Tensor]) -> bool:
        """`_still_ours`, and in the same slot."""
        return (self._still_ours(adapters, received)
                and self.slot < len(adapters.lora_index_to_id)
                and adapters.lora_index_to_id[self.slot] == self.lora_id)

    def parked(self, adapters: Any, received: list[torch.Tensor]) -> bool:
        """`_still_ours`, but in no slot (another adapter took it): vLLM copies it into a
        slot again when it is next activated, after `refresh`."""
        return (self._still_ours(adapters, received)
                and self.lora_id not in adapters.lora_index_to_id)

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the received tensors into the active slot and scale the lora_b parts (one
        foreach copy, one foreach scale per distinct scale). Runs in the engine thread, between
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


def install(manager: Any, lora_id: int, buckets: list[torch.Tensor]) -> str:
    """Make adapter `lora_id` serve the values just received into `buckets` (already its
    tensors in `manager._lora_sync_tensors`), the cheapest way that stays right, and say
    which. Runs in the engine's thread, between engine steps."""
    adapters = manager._adapter_manager
    plan = manager._lora_sync_plans.get(lora_id)
    if plan is not None and plan.usable(adapters, buckets):
        plan.apply()
        return "slot copy"
    if plan is not None and plan.parked(adapters, buckets):
        plan.stale = True  # the wrapped activate_adapter refreshes it from the buckets
        return "at activation"
    if lora_id not in adapters._registered_adapters:
        return "at reload"  # evicted: the wrapped _load_adapter builds it from the buckets
    # vLLM's own add path (validation, LRU, slot activation) -> the wrapped _load_adapter.
    # The punica mapping is re-derived when the slot layout changes.
    adapters.remove_adapter(lora_id)
    manager.add_adapter(manager._lora_sync_requests[lora_id])
    manager._lora_sync_plans[lora_id] = SlotPlan.build(adapters, lora_id, buckets)
    return "rebuild"
