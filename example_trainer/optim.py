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

``build_scheduler`` gives a linear warm-up followed by a constant, linear or cosine decay.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

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


def build_optimizer(name: str, params: ParamsT, lr: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over the trainable ``params``.

    One entry point so configs name an optimizer by string and every choice gets the same
    requires-grad filtering.
    """
    try:
        builder = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid names: "
                         f"{', '.join(sorted(OPTIMIZERS))}") from None
    return builder(_trainable(params), lr, tuple(betas), eps, weight_decay)


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
    counters are left out. Works for any optimizer because it only walks ``optimizer.state``.
    """
    per_type = _state_tensor_bytes(optimizer)
    out = {"cpu": per_type.pop("cpu", 0), "accelerator": sum(per_type.values())}
    out.update(per_type)
    return out


# --------------------------------------------------------------------------------------
# CPU-offload AdamW
# --------------------------------------------------------------------------------------

def _adamw_foreach(params: list[torch.Tensor], grads: list[torch.Tensor],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor], *,
                   step: float, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float) -> None:
    """One AdamW update of fp32 CPU tensors, op for op as ``torch.optim.AdamW`` does it.

    The same operation order (and Python-float bias corrections) keeps results identical
    to torch's own implementation, not just close. CPU foreach ops loop over the regular
    strided kernels, so non-contiguous views are updated where they live.
    """
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2 ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -step_size)


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


class CPUOffloadAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in CPU memory, so the accelerator holds only weights and grads.

    Semantics are exactly ``torch.optim.AdamW`` (decoupled weight decay, bias correction,
    no amsgrad/maximize); state keys are the standard ``step``, ``exp_avg``, ``exp_avg_sq``
    plus ``master`` (an fp32 CPU copy) for parameters that are not fp32 CPU tensors. fp32
    CPU parameters are their own master and are updated in place, views included.

    For CUDA parameters a step runs as a pipeline over buckets of about ``bucket_bytes``:
    bucket i+1's grads are copied into pinned CPU memory on a side stream while bucket i is
    updated on the CPU, and each updated bucket is copied back to the device without
    blocking. The compute stream waits for those copies at the end of ``step``.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, bucket_bytes: int = 64 * MiB) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.bucket_bytes = bucket_bytes
        # Two pinned staging buffers per CUDA device (double buffering); not checkpointed.
        self._staging: dict[torch.device, list[torch.Tensor]] = {}
        self._side_streams: dict[torch.device, Any] = {}

    # -- state ------------------------------------------------------------------------

    @staticmethod
    def _pin() -> bool:
        return torch.cuda.is_available()

    @staticmethod
    def _needs_master(p: torch.Tensor) -> bool:
        return not (p.device.type == "cpu" and p.dtype == torch.float32)

    def _cpu_fp32(self, t: torch.Tensor, pin: bool) -> torch.Tensor:
        """A fresh fp32 CPU tensor (pinned for device parameters) holding ``t``'s values."""
        out = torch.empty(t.shape, dtype=torch.float32, pin_memory=pin)
        out.copy_(t.detach())
        return out

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        pin = self._pin() and p.device.type != "cpu"
        state["step"] = torch.tensor(0.0)
        if self._needs_master(p):
            state["master"] = self._cpu_fp32(p, pin)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=pin)
        else:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint, keeping moments and masters in fp32 CPU memory.

        The base class would cast every state tensor to its parameter's device and dtype,
        which would put the state on the accelerator and round fp32 masters to bf16, so
        only the step counters go through it and the rest is restored here.
        """
        saved_state = state_dict["state"]
        steps_only = {k: {kk: vv for kk, vv in v.items() if kk == "step"}
                      for k, v in saved_state.items()}
        super().load_state_dict({**state_dict, "state": steps_only})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            saved = saved_state[pid]
            state = self.state[p]
            state["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).clone()
            pin = self._pin() and p.device.type != "cpu"
            for key in ("exp_avg", "exp_avg_sq"):
                if self._needs_master(p):
                    state[key] = self._cpu_fp32(saved[key], pin)
                else:
                    state[key] = torch.empty_like(p, memory_format=torch.preserve_format)
                    state[key].copy_(saved[key])
            if self._needs_master(p):
                source = saved.get("master", p)
                state["master"] = self._cpu_fp32(source, pin)
            elif "master" in saved:
                # Saved from a bf16/CUDA run, resumed on fp32 CPU: the master is the truth.
                with torch.no_grad():
                    p.copy_(saved["master"])

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer memory: ``{"cpu": ..., "accelerator": 0}`` by construction.

        Includes the pinned staging buffers, which are CPU memory this optimizer holds.
        """
        out = optimizer_state_bytes(self)
        out["cpu"] += sum(b.numel() for bufs in self._staging.values() for b in bufs)
        return out

    # -- step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply one AdamW update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cpu_items: list[tuple[torch.Tensor, dict[str, Any]]] = []
        device_items: dict[torch.device, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
                self._init_state(p)
                if p.device.type == "cpu":
                    cpu_items.append((p, group))
                elif p.device.type == "cuda":
                    device_items.setdefault(p.device, []).append((p, group))
                else:
                    raise RuntimeError(f"CPUOffloadAdamW supports CPU and CUDA parameters, "
                                       f"not {p.device.type}")
        if cpu_items:
            grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float()
                     for p, _ in cpu_items]
            self._update(cpu_items, grads)
            for p, _ in cpu_items:
                if "master" in self.state[p]:
                    p.copy_(self.state[p]["master"])
        for device, items in device_items.items():
            self._step_cuda(device, items)
        return loss

    def _update(self, items: list[tuple[torch.Tensor, dict[str, Any]]],
                grads: list[torch.Tensor]) -> None:
        """Advance step counters and update the CPU masters of ``items`` with fp32 ``grads``.

        Tensors are batched into foreach calls per (param group, step), since the
        hyper-parameters and bias corrections are scalars shared within such a batch.
        """
        batches: dict[tuple[int, float], list[int]] = {}
        for i, (p, group) in enumerate(items):
            state = self.state[p]
            state["step"] += 1
            batches.setdefault((id(group), float(state["step"])), []).append(i)
        for (_, step), idx in batches.items():
            group = items[idx[0]][1]
            states = [self.state[items[i][0]] for i in idx]
            masters = [s.get("master", items[i][0]) for s, i in zip(states, idx)]
            beta1, beta2 = group["betas"]
            _adamw_foreach(masters, [grads[i] for i in idx],
                           [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                           step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                           eps=group["eps"], weight_decay=group["weight_decay"])

    def _buckets(self, items: list[tuple[torch.Tensor, dict[str, Any]]]
                 ) -> list[list[tuple[torch.Tensor, dict[str, Any]]]]:
        buckets: list[list[tuple[torch.Tensor, dict[str, Any]]]] = [[]]
        size = 0
        for item in items:
            nbytes = item[0].numel() * 4
            if buckets[-1] and size + nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += nbytes
        return buckets

    @staticmethod
    def _slot_bytes(p: torch.Tensor) -> int:
        """Staging bytes for one parameter: it holds the grad, later the updated weight."""
        return _align(p.numel() * max(p.element_size(), p.grad.element_size()))

    def _staging_buffers(self, device: torch.device, nbytes: int) -> list[torch.Tensor]:
        bufs = self._staging.get(device)
        if bufs is None or bufs[0].numel() < nbytes:
            bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._staging[device] = bufs
        return bufs

    def _step_cuda(self, device: torch.device,
                   items: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Pipelined offload step for the CUDA parameters on one device.

        Ordering argument: all copies run on one side stream, so a buffer's upload (H2D) of
        bucket i finishes before the download (D2H) of bucket i+2 into the same buffer; the
        CPU touches a buffer only after waiting for that bucket's download event.
        """
        buckets = self._buckets(items)
        bufs = self._staging_buffers(
            device, max(sum(self._slot_bytes(p) for p, _ in b) for b in buckets))
        side = self._side_streams.get(device)
        if side is None:
            side = self._side_streams[device] = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))  # grads are ready there

        def slots(bucket, buf: torch.Tensor, use_param_dtype: bool) -> list[torch.Tensor]:
            views, offset = [], 0
            for p, _ in bucket:
                dtype = p.dtype if use_param_dtype else p.grad.dtype
                n = p.numel() * dtype.itemsize
                views.append(buf[offset:offset + n].view(dtype).view(p.shape))
                offset += self._slot_bytes(p)
            return views

        def download(i: int):
            grads = slots(buckets[i], bufs[i % 2], use_param_dtype=False)
            with torch.cuda.stream(side):
                for (p, _), g in zip(buckets[i], grads):
                    g.copy_(p.grad, non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            return grads, event

        pending = download(0)
        for i, bucket in enumerate(buckets):
            grads, event = pending
            if i + 1 < len(buckets):
                pending = download(i + 1)  # overlaps with the CPU update below
            event.synchronize()
            self._update(bucket, [g if g.dtype == torch.float32 else g.float() for g in grads])
            uploads = slots(bucket, bufs[i % 2], use_param_dtype=True)
            for (p, _), u in zip(bucket, uploads):
                u.copy_(self.state[p]["master"])
            with torch.cuda.stream(side):
                for (p, _), u in zip(bucket, uploads):
                    p.copy_(u, non_blocking=True)
        torch.cuda.current_stream(device).wait_stream(side)


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
