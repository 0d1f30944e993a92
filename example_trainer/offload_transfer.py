"""Device<->host transfers of :class:`~example_trainer.offload_adamw.CPUOffloadAdamW`.

Kept apart from the optimizer so that its module holds the state and the AdamW math and this
one the machinery that moves data: one pinned host buffer per device with a slot for every
CUDA parameter (its gradient comes down into the slot, the new weight goes back up from it),
a side stream per device so copies overlap compute, the bookkeeping of copies in flight
(``_Copy``: valid while the gradient is unchanged), the post-accumulate-grad hook, and the
split of the CPU update into chunks whose pieces start at 64-element boundaries.

Per chunk the optimizer waits for the chunk's copies, widens its gradients into an fp32
scratch buffer (:func:`_gather_grads`), updates the masters and narrows them into the same
pinned slots (:func:`_scatter_weights`): the chunk stays in cache between those passes, and
each finished parameter's host-to-device copy is issued at once, non-blocking.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

MiB = 1 << 20
# Pieces of a parameter start at multiples of this many elements (see chunks): 256 bytes
# of fp32, a multiple of any CPU vector width.
_PIECE_ALIGN = 64


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


@dataclass
class _Copy:
    """A device-to-host gradient copy in flight: valid while ``grad`` is unchanged."""

    done: Any  # torch.cuda.Event recorded on the side stream after the copy
    grad: torch.Tensor
    version: int
    in_backward: bool

    def valid_for(self, p: torch.Tensor) -> bool:
        return p.grad is self.grad and p.grad._version == self.version


@dataclass
class _Entry:
    """One parameter's part in a master update: where its grad comes from, where it goes."""

    p: torch.Tensor
    group: dict[str, Any]
    state: dict[str, Any]
    grad: torch.Tensor  # flat view: the pinned slot (CUDA) or p.grad (CPU)
    out: torch.Tensor | None  # flat view the new weights are narrowed into, if any
    ready: Any = None  # event to wait for before reading ``grad``


Piece = tuple[_Entry, int, int]  # elements [a, b) of one entry's parameter


class _GradSink(Protocol):
    def _on_grad(self, p: torch.Tensor) -> None: ...


class _GradHook:
    """Post-accumulate-grad hook; holds the optimizer weakly so dropping it frees memory."""

    def __init__(self, optimizer: _GradSink) -> None:
        self.ref = weakref.ref(optimizer)

    def __call__(self, p: torch.Tensor) -> None:
        opt = self.ref()
        if opt is not None:
            opt._on_grad(p)


class HostStaging:
    """Gradient hooks, pinned host slots, side streams, copies in flight and the widening
    scratch of one optimizer.

    Holds no strong reference to the optimizer (the hooks hold it weakly, so that dropping it
    frees its memory): the optimizer passes every parameter of each group it adds to
    :meth:`track`, in order.

    Stream ordering: every copy of a device runs on its one side stream, so an upload from a
    slot precedes the next step's download into it; the CPU touches a slot only after its
    download's event (:func:`_wait_ready`); the side stream waits for the compute stream
    before the step's first copy or upload (work queued there may still read the weights),
    and the optimizer makes the compute stream wait for the uploads at the end of its step.
    """

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []  # every tracked parameter, in group order
        self.hook_handles: list[Any] = []
        self.hooked: set[int] = set()
        self.pending: dict[torch.Tensor, _Copy] = {}  # insertion order = copy order
        self.buffers: dict[torch.device, torch.Tensor] = {}
        self.slots: dict[torch.Tensor, tuple[int, int]] = {}  # p -> (offset, nbytes)
        self.side_streams: dict[torch.device, Any] = {}
        self.scratch: torch.Tensor | None = None  # fp32, for widening one chunk's grads

    def track(self, params: list[torch.Tensor], sink: _GradSink) -> None:
        """Give ``params`` slots (allocated on first use) and each one that needs a gradient
        a hook telling ``sink`` its gradient is final."""
        self.params.extend(params)
        for p in params:
            if p.requires_grad and id(p) not in self.hooked:
                self.hooked.add(id(p))
                self.hook_handles.append(p.register_post_accumulate_grad_hook(_GradHook(sink)))

    def remove_hooks(self) -> None:
        for handle in self.hook_handles:
            handle.remove()
        self.hook_handles.clear()
        self.hooked.clear()

    def nbytes(self) -> int:
        """Host memory held besides the optimizer state: the pinned slots and the scratch."""
        scratch = 0 if self.scratch is None else self.scratch.numel() * 4
        return sum(b.numel() for b in self.buffers.values()) + scratch

    def side_stream(self, device: torch.device) -> Any:
        side = self.side_streams.get(device)
        if side is None:
            side = self.side_streams[device] = torch.cuda.Stream(device)
        return side

    def slot(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``p``'s pinned host slot as a flat ``dtype`` tensor: the grad, later the weight.

        One pinned buffer per device holds a slot for every CUDA parameter of the optimizer
        (gradients have their parameter's dtype), allocated on first use.
        """
        if p not in self.slots:
            self._allocate_slots(p.device)
        offset, _ = self.slots[p]
        n = p.numel() * dtype.itemsize
        return self.buffers[p.device][offset:offset + n].view(dtype)

    def _allocate_slots(self, device: torch.device) -> None:
        params = [p for p in self.params if p.device == device and p not in self.slots]
        old = self.buffers.get(device)
        total = 0 if old is None else old.numel()
        if old is not None:
            # A group added after the first step: keep existing slots (and any copies in
            # them), grow the buffer.
            torch.cuda.synchronize(device)
        layout = {}
        for p in params:
            nbytes = _align(p.numel() * p.element_size())
            layout[p] = (total, nbytes)
            total += nbytes
        buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        if old is not None:
            buf[:old.numel()].copy_(old)
        self.buffers[device] = buf
        self.slots.update(layout)
        log.debug("adamw_cpu: %.1f MiB of pinned staging on %s", total / MiB, device)

    def copy_grad(self, p: torch.Tensor, *, in_backward: bool) -> None:
        """Start copying ``p.grad`` into its pinned slot on the side stream."""
        grad = p.grad
        side = self.side_stream(p.device)
        slot = self.slot(p, grad.dtype).view(grad.shape)
        side.wait_stream(torch.cuda.current_stream(p.device))  # the grad is final there
        with torch.cuda.stream(side):
            slot.copy_(grad, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        grad.record_stream(side)  # its memory may be freed before the copy has run
        self.pending.pop(p, None)
        self.pending[p] = _Copy(done, grad, grad._version, in_backward)

    def entries(self, device: torch.device,
                items: list[tuple[torch.Tensor, dict[str, Any]]],
                state: Any) -> tuple[list[_Entry], int, int]:
        """One device's update entries in copy order, reading from and writing to the slots.

        Makes the side stream wait for the compute stream first (work queued there may still
        read the weights), then copies every gradient that has no valid copy yet (none, or
        changed after it). Returns the entries and the counts of copies issued in backward
        and now.
        """
        side = self.side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        group_of = {p: group for p, group in items}
        ordered = [p for p, c in self.pending.items() if p in group_of and c.valid_for(p)]
        in_backward = sum(self.pending[p].in_backward for p in ordered)
        fresh, at_step = set(ordered), 0
        for p, _ in items:
            if p not in fresh:  # no copy yet, or the grad changed after it: copy now
                self.copy_grad(p, in_backward=False)
                ordered.append(p)
                at_step += 1
        out = []
        for p in ordered:
            slot = self.slot(p, p.dtype)
            out.append(_Entry(p, group_of[p], state[p], slot, slot,
                              ready=self.pending[p].done))
        return out, in_backward, at_step

    def update_in_chunks(self, entries: list[_Entry], chunk_elems: int,
                         update: Callable[[list[Piece], list[torch.Tensor]], None],
                         on_done: Callable[[_Entry], None] | None,
                         stats: dict[str, float]) -> None:
        """Run ``update`` (the optimizer's math) over the entries chunk by chunk, in order.

        Per chunk: wait for its copies, gather its fp32 grads (others widened into the
        scratch), ``update(chunk, grads)``, scatter the masters into ``out``. ``stats`` gains
        the seconds spent waiting (``wait_s``) and the rest of the chunk (``update_s``).
        """
        widened = sum(e.p.numel() for e in entries if e.grad.dtype != torch.float32)
        n = min(chunk_elems, widened)
        if self.scratch is None or self.scratch.numel() < n:
            self.scratch = torch.empty(n, dtype=torch.float32)
        for chunk in chunks(entries, chunk_elems):
            t_wait = time.perf_counter()
            _wait_ready(chunk)
            t_update = time.perf_counter()
            stats["wait_s"] = stats.get("wait_s", 0.0) + t_update - t_wait
            update(chunk, _gather_grads(chunk, self.scratch))
            _scatter_weights(chunk, on_done)
            stats["update_s"] = stats.get("update_s", 0.0) + time.perf_counter() - t_update

    def upload(self, e: _Entry) -> None:
        """Copy ``e``'s new weights from its slot to the device, on the side stream."""
        with torch.cuda.stream(self.side_stream(e.p.device)):
            e.p.detach().copy_(e.out.view(e.p.shape), non_blocking=True)


def chunks(entries: list[_Entry], chunk_elems: int) -> Iterator[list[Piece]]:
    """Split the entries' elements into runs of at most ``chunk_elems`` elements.

    A piece of a parameter starts at a multiple of ``_PIECE_ALIGN`` elements: the fused
    kernel runs its vector loop from the start of each tensor and a scalar loop over
    the tail, whose results can differ in the last bit, so aligned pieces keep every
    element on the path it takes when the whole tensor is updated at once.
    """
    chunk: list[Piece] = []
    fill = 0
    for e in entries:
        n, start = e.p.numel(), 0
        while start < n:
            room = chunk_elems - fill
            take = n - start if n - start <= room else room // _PIECE_ALIGN * _PIECE_ALIGN
            if take == 0:
                yield chunk
                chunk, fill = [], 0
                continue
            chunk.append((e, start, start + take))
            fill += take
            start += take
            if fill >= chunk_elems:
                yield chunk
                chunk, fill = [], 0
    if chunk:
        yield chunk


def _wait_ready(chunk: list[Piece]) -> None:
    """Block until the gradient copies of the parameters starting in ``chunk`` have landed."""
    for e, a, _ in chunk:
        if a == 0 and e.ready is not None:
            e.ready.synchronize()


def _gather_grads(chunk: list[Piece],
                 scratch: torch.Tensor) -> list[torch.Tensor]:
    """The chunk's gradient pieces in fp32: fp32 ones where they are, others widened into
    consecutive runs of ``scratch`` (which must hold the chunk's non-fp32 elements)."""
    grads, offset = [], 0
    for e, a, b in chunk:
        src = e.grad[a:b]
        if src.dtype == torch.float32:
            grads.append(src)
        else:
            g = scratch[offset:offset + b - a]
            g.copy_(src)
            grads.append(g)
            offset += b - a
    return grads


def _scatter_weights(chunk: list[Piece],
                    on_done: Callable[[_Entry], None] | None) -> None:
    """Narrow the chunk's updated master pieces into their ``out`` views; a parameter whose
    last piece this is goes to ``on_done`` (its upload) or, without an ``out`` view, is
    copied from its master."""
    for e, a, b in chunk:
        master = e.state["master"]
        if e.out is not None:
            e.out[a:b].copy_(master.view(-1)[a:b])
        if b == e.p.numel():
            if on_done is not None:
                on_done(e)
            elif e.out is None:
                e.p.detach().copy_(master)
