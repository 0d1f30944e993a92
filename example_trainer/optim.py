"""Optimizers and learning-rate schedules, chosen by name from the config.

``build_optimizer(name, params, lr, ...)`` looks ``name`` up in ``OPTIMIZERS``; adding an
optimizer is one entry there. The choices trade accelerator memory for speed:

==============  ===============================================================  ==========
name            what it is                                                       state/param
==============  ===============================================================  ==========
``adamw``       ``torch.optim.AdamW`` (fused on contiguous CUDA params)          8 B on device
``adamw_8bit``  ``bitsandbytes.optim.AdamW8bit`` (block-wise quantised moments)  ~2 B on device
``adamw_cpu``   :class:`CPUOffloadAdamW`: exact AdamW, all state in CPU memory   0 B on device
``adafactor``   ``transformers`` Adafactor (factored second moment)              ~(rows+cols)
==============  ===============================================================  ==========

Why ``adamw`` is fused only on contiguous CUDA tensors: measured with torch 2.13, one step
of fused AdamW on a CPU parameter that is a transposed slice of a larger tensor wrote wrong
values (max error 0.2 at lr 0.1 against ``foreach=False``), while the foreach path was exact.
Trainers whose parameters are views into memory shared with an inference server hit exactly
that case, so anything that is not a contiguous CUDA tensor gets ``foreach=True``.

Low-precision (bf16/fp16) trainable parameters get fp32 master weights by default: the
optimizer is wrapped in :class:`MasterWeightsOptimizer` (4 B/param more), because updates
below ~1/256 of a bf16 weight would otherwise round away. ``adamw_cpu`` has its own masters.

``build_scheduler`` gives a linear warm-up followed by a constant, linear or cosine decay.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .offload_adamw import CPUOffloadAdamW
from .master_weights import MasterWeightsOptimizer, needs_master

log = logging.getLogger(__name__)

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

MiB = 1 << 20
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class OptionalDependencyError(ImportError):
    """An optimizer was asked for whose package is not installed."""


# --------------------------------------------------------------------------------------
# Parameter handling
# --------------------------------------------------------------------------------------

def _trainable(params: ParamsT) -> list[torch.Tensor] | list[dict[str, Any]]:
    """Keep only parameters with ``requires_grad`` (frozen base weights under LoRA, say).

    Accepts a flat iterable of tensors or of param-group dicts; groups left empty are dropped
    so optimizers that reject empty groups do not fail.
    """
    items = list(params)
    if items and isinstance(items[0], dict):
        groups = []
        for group in items:
            ps = group["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            kept = [p for p in ps if p.requires_grad]
            if kept:
                groups.append({**group, "params": kept})
        if not groups:
            raise ValueError("no parameter requires grad; nothing to optimize")
        return groups
    kept = [p for p in items if p.requires_grad]
    if not kept:
        raise ValueError("no parameter requires grad; nothing to optimize")
    return kept


def _flat(params: list[torch.Tensor] | list[dict[str, Any]]) -> list[torch.Tensor]:
    if params and isinstance(params[0], dict):
        return [p for g in params for p in g["params"]]
    return list(params)


def _can_fuse(params: list[torch.Tensor]) -> bool:
    """Fused AdamW only where it is known to be correct: contiguous CUDA floats."""
    return all(p.is_cuda and p.is_contiguous() and p.dtype in _FUSED_DTYPES for p in params)


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------

def _build_adamw(params, lr, betas, eps, weight_decay) -> torch.optim.Optimizer:
    fused = _can_fuse(_flat(params))
    kind = {"fused": True} if fused else {"foreach": True}
    log.debug("adamw: %s", "fused" if fused else "foreach")
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps,
                             weight_decay=weight_decay, **kind)


def _import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise OptionalDependencyError(
            "optimizer 'adamw_8bit' needs bitsandbytes: `pip install bitsandbytes` "
            "(or install this project with its `cpu` or `gpu` extra, "
            "e.g. `pip install -e .[gpu]`)") from exc
    return bitsandbytes


@functools.cache
def _bnb_cpu_error() -> str | None:
    """Run one 8-bit AdamW step on a CPU tensor; return why it failed, or None if it works.

    Only recent bitsandbytes releases have CPU kernels; older ones fail deep inside with an
    unhelpful message. 4096 elements is bitsandbytes' threshold for using 8-bit state.
    """
    bnb = _import_bitsandbytes()
    probe = torch.nn.Parameter(torch.ones(4096))
    probe.grad = torch.full_like(probe, 0.5)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as exc:  # any failure means "not usable on CPU"; reported below
        return f"{type(exc).__name__}: {exc}"
    if not torch.isfinite(probe).all() or torch.equal(probe.detach(), torch.ones(4096)):
        return "the probe step left the parameter unchanged or non-finite"
    return None


def _build_adamw_8bit(params, lr, betas, eps, weight_decay) -> torch.optim.Optimizer:
    bnb = _import_bitsandbytes()
    flat = _flat(params)
    # bitsandbytes replaces a non-contiguous p.data with a contiguous copy before updating
    # it, so a parameter that is a view into shared memory silently stops being one.
    bad = [tuple(p.shape) for p in flat if not p.is_contiguous()]
    if bad:
        raise ValueError(
            f"adamw_8bit cannot update non-contiguous parameters in place (shapes {bad}): "
            "bitsandbytes swaps them for contiguous copies, breaking any memory they alias; "
            "use 'adamw' or 'adamw_cpu'")
    if any(p.device.type == "cpu" for p in flat):
        why = _bnb_cpu_error()
        if why is not None:
            raise RuntimeError(
                f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 8-bit AdamW on "
                f"CPU tensors ({why}); it needs CUDA parameters here, or a newer "
                "bitsandbytes with CPU support, or use 'adamw' / 'adamw_cpu'")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _build_adamw_cpu(params, lr, betas, eps, weight_decay) -> torch.optim.Optimizer:
    return CPUOffloadAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _build_adafactor(params, lr, betas, eps, weight_decay) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor
    # Adafactor has its own (eps1, eps2) and beta2 schedule; AdamW's betas/eps do not apply.
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                     warmup_init=False, weight_decay=weight_decay)


OptimizerBuilder = Callable[[Any, float, tuple[float, float], float, float],
                            torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": _build_adamw,
    "adamw_8bit": _build_adamw_8bit,
    "adamw_cpu": _build_adamw_cpu,
    "adafactor": _build_adafactor,
}


# Optimizers that already keep fp32 masters of low-precision parameters themselves.
OWN_MASTERS = frozenset({"adamw_cpu"})

LOST_UPDATE_WARNING = (
    "master weights are off: optimizer %r updates %s parameters directly. bf16 updates "
    "smaller than ~1/256 of a weight round away; at lr 1e-6 most of each AdamW update is "
    "lost (one step applied under 3%% of it). Use --master-weights auto to keep fp32 masters")


def build_optimizer(name: str, params: ParamsT, lr: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0, master_weights: bool | None = None
                    ) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over the trainable ``params``.

    One entry point so configs name an optimizer by string and every choice gets the same
    requires-grad filtering and the same precision policy. ``master_weights``: ``None``
    (auto) or ``True`` wraps the optimizer in :class:`MasterWeightsOptimizer` when any
    trainable parameter is bf16/fp16, so updates below bf16 resolution are not lost;
    ``False`` updates such parameters directly (with a warning). Optimizers in
    ``OWN_MASTERS`` are never wrapped; fp32 parameters need no masters.
    """
    try:
        builder = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid names: "
                         f"{', '.join(sorted(OPTIMIZERS))}") from None
    params = _trainable(params)
    betas = tuple(betas)
    low = sorted({str(p.dtype).removeprefix("torch.") for p in _flat(params)
                  if needs_master(p)})
    if not low or name in OWN_MASTERS:
        return builder(params, lr, betas, eps, weight_decay)
    if master_weights is False:
        log.warning(LOST_UPDATE_WARNING, name, "/".join(low))
        return builder(params, lr, betas, eps, weight_decay)
    log.info("%s over fp32 master weights of the %s parameters", name, "/".join(low))
    return MasterWeightsOptimizer(
        params, lambda groups: builder(groups, lr, betas, eps, weight_decay))


# --------------------------------------------------------------------------------------
# State accounting
# --------------------------------------------------------------------------------------

def _state_tensor_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    out: dict[str, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step" or not isinstance(value, torch.Tensor):
                continue  # the step counter is bookkeeping, not memory worth reporting
            kind = value.device.type
            out[kind] = out.get(kind, 0) + value.numel() * value.element_size()
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of tensor state per device type, for comparing optimizers' memory cost.

    Returns ``{"cpu": n, "accelerator": m, <type>: ...}``: ``accelerator`` sums every
    non-CPU device type, which also appears under its own name (``"cuda"``). The ``step``
    counters are left out. Works for any optimizer because it only walks ``optimizer.state``;
    a :class:`MasterWeightsOptimizer` counts its inner optimizer's state plus its masters.
    """
    if isinstance(optimizer, MasterWeightsOptimizer):
        per_type = _state_tensor_bytes(optimizer.inner)
        for kind, nbytes in optimizer.master_bytes().items():
            per_type[kind] = per_type.get(kind, 0) + nbytes
    else:
        per_type = _state_tensor_bytes(optimizer)
    out = {"cpu": per_type.pop("cpu", 0), "accelerator": sum(per_type.values())}
    out.update(per_type)
    return out


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------

SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


class WarmupSchedule:
    """LR multiplier: linear warm-up to 1, then constant, linear or cosine decay to 0.

    Warm-up reaches full LR on step ``warmup_steps - 1`` ((step+1)/warmup) so no step is
    spent at LR 0. A callable object rather than a lambda so ``LambdaLR.state_dict`` saves
    its settings and a resumed run follows the same curve.
    """

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    schedule: str = "constant") -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then ``schedule`` (one of ``SCHEDULES``); decays reach 0 at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant" and total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) < warmup_steps ({warmup_steps})")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupSchedule(warmup_steps, total_steps, schedule))
