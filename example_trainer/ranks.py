"""What rank 0 alone does under torchrun, and what the other ranks see of it.

Rank 0 is the only rank that talks to the trajectory API and to vLLM; the loop of a mode is
the same on every rank (trainer.py's docstring). These pieces keep the ranks in step:

* `on_main(dist, work)` runs work on rank 0 and hands every rank its result, or its failure
  (`RankFailed` elsewhere, so no rank waits forever in the next collective);
* `RankZeroFetcher` fetches on rank 0 and broadcasts each batch (or the error or signal that
  ended the wait); its rank-0 duties are no-ops elsewhere;
* `any_rank_signal` makes all ranks stop at the same step boundary on any rank's signal;
* `OtherRankVLLM` / `OtherRankClient`: the vLLM handle and client of a rank other than 0,
  whose calls do nothing; `ShardedParityProbe`: the parity probe when the trainer's forward
  is collective;
* `lost_rank_error`: a rank whose process died is named in one line (`RankLost`), instead of
  the connection error a collective reports.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist

from .batch import Batch
from .distributed import Dist, broadcast_object
from .parity import ParityProbe

log = logging.getLogger(__name__)


class RankFailed(RuntimeError):
    """Rank 0 failed in work only it does (the API, vLLM): the other ranks stop with this,
    naming rank 0's error, instead of waiting for it in the next collective."""


class RankLost(RankFailed):
    """A rank's process died (killed or crashed): every other rank stops with this, naming
    it, instead of a collective's connection error."""


def lost_rank_error(dist: Dist, save_path: str) -> RankLost | None:
    """The one-line error for ranks that died, or None when every rank on this machine lives."""
    lost = dist.lost_ranks()
    if not lost:
        return None
    which = ", ".join(f"rank {r} (pid {dist.processes[r][1]})" for r in lost)
    return RankLost(f"{which} of {dist.world_size} is gone (killed, crashed or exited), so "
                    f"every rank stopped; resume from the last checkpoint in {save_path} "
                    "(--resume)")


def _stop_message(err: BaseException) -> tuple[str, Any]:
    if isinstance(err, KeyboardInterrupt):
        return ("interrupted", getattr(err, "signum", None))
    return ("failed", f"{type(err).__name__}: {err}".splitlines()[0])


def raise_stop(stop: tuple[str, Any]) -> None:
    """On a rank other than 0: raise what `_stop_message` described."""
    import signal
    from .checkpoint import Interrupted
    kind, detail = stop
    if kind == "interrupted":
        raise Interrupted(detail or signal.SIGINT)
    raise RankFailed(f"rank 0 failed ({detail})")


def on_main(dist: Dist, work: Callable[[], Any]) -> Any:
    """Run `work()` on rank 0 only; every rank returns its result, or raises when it failed
    (rank 0 its own error, the others `RankFailed` or `Interrupted`). Collective."""
    result: Any = None
    if dist.is_main:
        try:
            result = ("ok", work())
        except BaseException as err:
            broadcast_object(dist, _stop_message(err))
            raise
    outcome = broadcast_object(dist, result)
    if outcome[0] != "ok":
        raise_stop(outcome)
    return outcome[1]


def any_rank_signal(dist: Dist, pending: int | None) -> int:
    """The signal some rank has received and deferred (0: none); the same on every rank, so
    all ranks stop at the same step boundary. Collective."""
    flag = torch.tensor([pending or 0], dtype=torch.int64)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return int(flag.item())


class RankZeroFetcher:
    """A BatchFetcher on rank 0, its batches on every rank.

    Rank 0 registers with the API and fetches (`inner`); `next_batch` broadcasts the batch,
    or the error or signal that ended rank 0's wait (then every rank raises). The fetcher's
    other duties (leases, weight versions, telling the API that training finished) are rank
    0's: on other ranks those calls do nothing. `in_flight_step` is known on every rank."""

    def __init__(self, dist: Dist, inner: Any, starting_step: int) -> None:
        self.dist, self.inner = dist, inner
        self.starting_step, self.handed_out = starting_step, 0
        if not dist.is_main:
            self.replay: list = []

    def next_batch(self) -> Batch:
        if self.dist.is_main:
            try:
                batch = self.inner.next_batch()
            except BaseException as err:  # the others are waiting for this broadcast
                broadcast_object(self.dist, _stop_message(err))
                raise
            broadcast_object(self.dist, ("ok", batch.to("cpu")))
        else:
            kind, batch = broadcast_object(self.dist)
            if kind != "ok":
                raise_stop((kind, batch))
        self.handed_out += 1
        return batch

    @property
    def in_flight_step(self) -> int:
        return self.starting_step + self.handed_out

    def __getattr__(self, name: str) -> Any:
        # Rank 0: the real fetcher's attributes. Elsewhere: the no-op view (_NOT_MAIN).
        inner = self.__dict__.get("inner")
        if inner is not None:
            return getattr(inner, name)
        if name in _NOT_MAIN:
            return _NOT_MAIN[name]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("inner")
        if name == "replay" and inner is not None:
            inner.replay = value
        else:
            object.__setattr__(self, name, value)


def _nothing(*_: Any, **__: Any) -> None:
    return None


# What the fetcher's rank-0 duties look like on the other ranks.
_NOT_MAIN: dict[str, Any] = {
    "publish_weight_version": _nothing, "add_watchdog": _nothing, "finish": _nothing,
    "checkpoint_saved": _nothing, "flush_acknowledgements": _nothing,
    "lease_record": _nothing, "metrics": lambda: {}, "untrained": lambda _step: [],
    "in_flight": None, "in_flight_rng": None, "rejected_groups": 0}


class OtherRankClient:
    """vLLM's client on a rank other than 0: rank 0 makes the calls, here they do nothing
    (`paused` is an empty context)."""

    def paused(self, *_: Any, **__: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def reset_prefix_cache(self, *_: Any, **__: Any) -> bool:
        return True  # rank 0's reset is the one that counts

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *_, **__: None


class OtherRankVLLM:
    """The vLLM handle of a rank other than 0 under torchrun: rank 0 alone starts and talks to
    vLLM, so what a mode calls here does nothing (`restart` reports 0 s)."""

    url = ""
    client = OtherRankClient()
    server = None
    restarts = 0

    def restart(self, model_path: str | Path | None = None) -> float:
        return 0.0

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def on_restart(self, resync: Callable[[], None]) -> None:
        pass

    def on_served_again(self, announce: Callable[[], None]) -> None:
        pass

    def stop(self) -> None:
        pass


class ShardedParityProbe(ParityProbe):
    """Rank 0's probe for a sharded model, whose forward every rank must run together:
    `sequences()` reads vLLM and names what the trainer scores (the probe now and the
    previous one; they differ when vLLM samples it, for an adapter), every rank scores them,
    and `check_scored(scores)` compares on rank 0."""

    def sequences(self) -> list[list[int]] | None:
        with self.guard():
            self._now = self._served()
            return [self._now[0], self.previous[0]]
        return None  # the guard swallowed a failure (a restart resyncs and publishes)

    def check_scored(self, scores: list[torch.Tensor]) -> dict[str, float]:
        self._scores = scores
        return self._compare(*self._now)

    def _trainer(self, tokens: list[int], n: int) -> torch.Tensor:
        current, previous = self._scores
        return (current if tokens == self._now[0] else previous)[-n:]


def broadcast_or_local(dist: Dist | None, value: Any) -> Any:
    """Rank 0's `value` on every rank (collective), or `value` itself in one process."""
    return value if dist is None else broadcast_object(dist, value)


__all__ = ["OtherRankClient", "OtherRankVLLM", "RankFailed", "RankLost", "RankZeroFetcher",
           "ShardedParityProbe", "any_rank_signal", "broadcast_or_local", "lost_rank_error",
           "on_main", "raise_stop"]
