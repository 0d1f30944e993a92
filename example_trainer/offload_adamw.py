"""CPU-offload AdamW: exact ``torch.optim.AdamW`` with every state tensor in CPU memory.

The accelerator holds only weights and gradients. On CUDA one step has a floor set by the
hardware: copy the gradients to the host, run AdamW over fp32 masters on the CPU, copy the
new weights back. This optimizer gets close to that floor by overlapping the pieces:

* **Gradient copies during backward.** Inside :meth:`CPUOffloadAdamW.last_backward` (the
  last micro-batch, whose gradients are final) a post-accumulate-grad hook copies each CUDA
  gradient to pinned host memory on a side stream as soon as autograd has finished it.
* **Clipping without waiting.** :meth:`CPUOffloadAdamW.clip_grad_norm_` computes the global
  norm on the device exactly as ``torch.nn.utils.clip_grad_norm_`` does but applies the
  coefficient to the fp32 host copies inside :meth:`step`, so copies in flight stay valid.
* **Chunked CPU update.** :meth:`step` runs torch's fused CPU AdamW (all cores) over the
  fp32 masters in cache-sized chunks, in copy order, and uploads each finished parameter
  at once, non-blocking, while the CPU moves on.

The transfers (pinned slots, side streams, copy bookkeeping, chunking) live in
:mod:`example_trainer.offload_transfer`; this module holds the state and the AdamW math.

A caller that never enters :meth:`last_backward` still gets correct results: :meth:`step`
copies whatever gradients it has no valid copy of, and a gradient changed in place after its
copy (``torch.nn.utils.clip_grad_norm_``, say) is detected by its version counter and copied
again.

fp32 CPU parameters are their own master and are updated in place with the foreach ops,
which handle strided views: trainers whose parameters are non-contiguous views into memory
shared with an inference server need that, and fused CPU AdamW on such views was measured
writing wrong memory (torch 2.13). Fused AdamW only ever sees the contiguous fp32 masters
this optimizer owns.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

# Names that lived here before the split stay importable from here.
from .offload_transfer import (_PIECE_ALIGN, MiB, HostStaging, Piece, _align,  # noqa: F401
                               _Copy, _Entry, _GradHook, chunks)

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


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
    to torch's foreach implementation, not just close. CPU foreach ops loop over the regular
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


def _fused_adamw_pieces(chunk: list[Piece], grads: list[torch.Tensor]) -> None:
    """Torch's fused CPU AdamW over the chunk's pieces of fp32 masters, one call per group;
    ``grads[i]`` is piece ``i``'s fp32 gradient, already scaled by the clip coefficient."""
    by_group: dict[int, list[int]] = {}
    for i, (e, _, _) in enumerate(chunk):
        by_group.setdefault(id(e.group), []).append(i)
    for idx in by_group.values():
        group = chunk[idx[0]][0].group
        beta1, beta2 = group["betas"]
        pieces = [(chunk[i][0].state, chunk[i][1], chunk[i][2]) for i in idx]
        torch._fused_adamw_(
            [s["master"].view(-1)[a:b] for s, a, b in pieces], [grads[i] for i in idx],
            [s["exp_avg"].view(-1)[a:b] for s, a, b in pieces],
            [s["exp_avg_sq"].view(-1)[a:b] for s, a, b in pieces], [],
            [s["step"] for s, _, _ in pieces], amsgrad=False, lr=float(group["lr"]),
            beta1=float(beta1), beta2=float(beta2),
            weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
            maximize=False, grad_scale=None, found_inf=None)

class CPUOffloadAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in CPU memory, so the accelerator holds only weights and grads.

    Semantics are exactly ``torch.optim.AdamW`` (decoupled weight decay, bias correction,
    no amsgrad/maximize); state keys are the standard ``step``, ``exp_avg``, ``exp_avg_sq``
    plus ``master`` (a contiguous fp32 CPU copy) for parameters that are not fp32 CPU
    tensors. Parameters with a master are updated by torch's fused CPU AdamW and equal
    ``torch.optim.AdamW(fused=True)`` run on fp32 CPU copies; fp32 CPU parameters are their
    own master and equal ``torch.optim.AdamW(foreach=True)``. See the module docstring for
    how a CUDA step overlaps with backward.

    ``chunk_bytes`` is the fp32 working set of one CPU update chunk (sized to stay in cache);
    ``cpu_threads`` the torch threads used for the CPU update of CUDA parameters (default:
    every core this process may run on; CPU parameters use torch's current setting, since a
    CPU trainer may be pinned to share the machine).
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, chunk_bytes: int = 32 * MiB,
                 cpu_threads: int | None = None) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr}, eps={eps} or weight_decay={weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        # Set before the base class adds the param groups: add_param_group installs hooks.
        self._transfers = HostStaging()  # hooks, pinned slots, side streams, copies
        self._armed = False
        self._clip_coef: torch.Tensor | None = None
        self.chunk_elems = max(1, chunk_bytes // 4 // _PIECE_ALIGN) * _PIECE_ALIGN
        self.cpu_threads = cpu_threads
        #: Counters of the last step: copies issued in backward / at step time, seconds
        #: spent waiting for copies and updating on the CPU.
        self.stats: dict[str, float] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    # -- hooks and the caller contract --------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._transfers.track(self.param_groups[-1]["params"], self)

    @property
    def _pending(self) -> dict[torch.Tensor, _Copy]:
        """Gradient copies in flight, in the order they were issued."""
        return self._transfers.pending

    @property
    def _hook_handles(self) -> list[Any]:
        return self._transfers.hook_handles

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (for callers that replace this optimizer)."""
        self._transfers.remove_hooks()

    @contextlib.contextmanager
    def last_backward(self) -> Iterator[None]:
        """Wrap the backward whose gradients are final: their host copies start at once."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._armed and p.device.type == "cuda" and p.grad is not None \
                and not p.grad.is_sparse:
            self._transfers.copy_grad(p, in_backward=True)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Global grad norm, computed on the device exactly as torch's ``clip_grad_norm_``.

        The clip coefficient is applied by :meth:`step` to the fp32 host copies, so copies
        already in flight need not wait; device gradients are left unscaled. Gradients of
        fp32 CPU parameters (their own master) are scaled in place now, as torch would.
        """
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.tensor(0.0)
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        own = [p.grad for p in params if not self._needs_master(p)]
        if own:
            torch._foreach_mul_(own, coef.to(own[0].device))
        self._clip_coef = coef if len(own) < len(params) else None
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forget copies and clip coefficients of a step that was skipped."""
        self._pending.clear()
        self._clip_coef = None
        super().zero_grad(set_to_none=set_to_none)

    # -- state ------------------------------------------------------------------------

    @staticmethod
    def _needs_master(p: torch.Tensor) -> bool:
        return not (p.device.type == "cpu" and p.dtype == torch.float32)

    @staticmethod
    def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
        """A fresh contiguous fp32 CPU tensor holding ``t``'s values."""
        out = torch.empty(t.shape, dtype=torch.float32)
        out.copy_(t.detach())
        return out

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if state:
            return state
        state["step"] = torch.tensor(0.0)
        if self._needs_master(p):
            state["master"] = self._cpu_fp32(p)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32)
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
        self._pending.clear()
        self._clip_coef = None
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
            for key in ("exp_avg", "exp_avg_sq"):
                if self._needs_master(p):
                    state[key] = self._cpu_fp32(saved[key])
                else:
                    state[key] = torch.empty_like(p, memory_format=torch.preserve_format)
                    state[key].copy_(saved[key])
            if self._needs_master(p):
                state["master"] = self._cpu_fp32(saved.get("master", p))
            elif "master" in saved:
                # Saved from a bf16/CUDA run, resumed on fp32 CPU: the master is the truth.
                with torch.no_grad():
                    p.copy_(saved["master"])

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer memory: ``{"cpu": ..., "accelerator": 0}`` by construction.

        Includes the pinned staging slots and the update scratch, CPU memory this optimizer
        holds besides its state.
        """
        out = _state_bytes(self)
        out["cpu"] += self._transfers.nbytes()
        return out

    # -- step -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _threads(self, use_all: bool) -> Iterator[None]:
        before = torch.get_num_threads()
        want = before
        if use_all:
            want = self.cpu_threads or max(before, len(os.sched_getaffinity(0)))
        if want != before:
            torch.set_num_threads(want)
        try:
            yield
        finally:
            if want != before:
                torch.set_num_threads(before)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply one AdamW update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        self._armed = False
        coef = self._clip_coef
        self._clip_coef = None
        coef_cpu = None if coef is None else coef.detach().to("cpu", torch.float32)
        own: list[tuple[torch.Tensor, dict[str, Any]]] = []
        cpu_entries: list[_Entry] = []
        cuda_items: dict[torch.device, list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
                state = self._init_state(p)
                if p.device.type == "cuda":
                    cuda_items.setdefault(p.device, []).append((p, group))
                elif p.device.type != "cpu":
                    raise RuntimeError(f"CPUOffloadAdamW supports CPU and CUDA parameters, "
                                       f"not {p.device.type}")
                elif not self._needs_master(p):
                    own.append((p, group))
                else:
                    out = p.detach().view(-1) if p.is_contiguous() else None
                    cpu_entries.append(_Entry(p, group, state, p.grad.reshape(-1), out))
        self.stats = {"copies_in_backward": 0.0, "copies_at_step": 0.0, "wait_s": 0.0,
                      "update_s": 0.0}
        if own:
            self._update_own(own)
        if cpu_entries:
            self._update_masters(cpu_entries, coef_cpu)
        if cuda_items:
            with self._threads(use_all=True):
                for device, items in cuda_items.items():
                    self._step_cuda(device, items, coef_cpu)
        self._pending.clear()
        self.stats["step_s"] = time.perf_counter() - t0
        return loss

    def _update_own(self, items: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        """Update fp32 CPU parameters in place (their own master), batched per group/step."""
        batches: dict[tuple[int, float], list[torch.Tensor]] = {}
        groups: dict[int, dict[str, Any]] = {}
        for p, group in items:
            state = self.state[p]
            state["step"] += 1
            batches.setdefault((id(group), float(state["step"])), []).append(p)
            groups[id(group)] = group
        for (gid, step), ps in batches.items():
            group = groups[gid]
            states = [self.state[p] for p in ps]
            beta1, beta2 = group["betas"]
            _adamw_foreach(ps, [p.grad for p in ps],
                           [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                           step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                           eps=group["eps"], weight_decay=group["weight_decay"])

    def _step_cuda(self, device: torch.device, items: list[tuple[torch.Tensor, dict[str, Any]]],
                   coef_cpu: torch.Tensor | None) -> None:
        """Update one device's parameters from their host copies and upload the results;
        the compute stream waits for the uploads (stream ordering: :class:`HostStaging`)."""
        entries, in_backward, at_step = self._transfers.entries(device, items, self.state)
        self.stats["copies_in_backward"] += in_backward
        self.stats["copies_at_step"] += at_step
        self._update_masters(entries, coef_cpu, on_done=self._transfers.upload)
        torch.cuda.current_stream(device).wait_stream(self._transfers.side_stream(device))

    def _update_masters(self, entries: list[_Entry], coef_cpu: torch.Tensor | None,
                        on_done: Callable[[_Entry], None] | None = None) -> None:
        """Fused AdamW over the entries' fp32 masters, chunk by chunk, in entry order.

        Per chunk: widen the grads into scratch (fp32 grads are used where they are), scale
        by the clip coefficient, update, narrow the masters into ``out``. A parameter whose
        last piece is done goes to ``on_done`` (its upload) or, without an ``out`` view, is
        copied from its master.
        """
        for e in entries:
            e.state["step"] += 1

        def update(chunk: list[Piece], grads: list[torch.Tensor]) -> None:
            if coef_cpu is not None:
                torch._foreach_mul_(grads, coef_cpu)
            _fused_adamw_pieces(chunk, grads)

        self._transfers.update_in_chunks(entries, self.chunk_elems, update, on_done, self.stats)
