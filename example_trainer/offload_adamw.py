"""CPU-offload AdamW: exact ``torch.optim.AdamW`` with every state tensor in CPU memory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
MiB = 1 << 20


def _state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    out = {"cpu": 0, "accelerator": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                kind = "cpu" if value.device.type == "cpu" else "accelerator"
                out[kind] += value.numel() * value.element_size()
    return out



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
        out = _state_bytes(self)
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
