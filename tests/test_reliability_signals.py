"""SafePoints: where SIGINT/SIGTERM may interrupt the trainer (real signals, this process)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from example_trainer.checkpoint import (SAFE_POINTS, Interrupted, SafePoints,
                                        guard_optimizer_updates)


def test_signal_outside_a_critical_section_raises_at_once() -> None:
    with SAFE_POINTS.installed(), pytest.raises(Interrupted) as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)  # let the handler run here, at the latest
        raise AssertionError("not interrupted")
    assert caught.value.signum == signal.SIGTERM and caught.value.name == "SIGTERM"
    assert isinstance(caught.value, KeyboardInterrupt)  # `except Exception` cannot eat it


def test_signal_inside_waits_for_the_outermost_section_to_end() -> None:
    finished = []
    with SAFE_POINTS.installed(), pytest.raises(Interrupted) as caught:
        with SAFE_POINTS.critical():
            with SAFE_POINTS.critical():
                os.kill(os.getpid(), signal.SIGINT)
                finished.append("inner")
            finished.append("outer")  # still inside the outer section: not interrupted yet
        finished.append("after")
    assert finished == ["inner", "outer"] and caught.value.signum == signal.SIGINT
    assert SAFE_POINTS.depth == 0 and SAFE_POINTS.pending is None


def test_an_error_inside_keeps_its_own_exception() -> None:
    points = SafePoints()
    with pytest.raises(ValueError):
        with points.critical():
            points.handler(signal.SIGTERM, None)
            raise ValueError("the real failure")
    assert points.depth == 0


def test_signals_during_clean_up_are_ignored() -> None:
    points = SafePoints()
    with points.stopping():
        points.handler(signal.SIGINT, None)  # a second Ctrl-C: logged, nothing raised
        with points.critical():
            points.handler(signal.SIGTERM, None)
    with pytest.raises(Interrupted):
        points.handler(signal.SIGINT, None)  # after the clean-up, signals work again


def test_optimizer_update_is_never_cut_in_half() -> None:
    """A SIGTERM sent from inside optimizer.step() lands after every parameter moved."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(4)]
    optimizer = torch.optim.SGD(params, lr=1.0)
    done = []
    guard_optimizer_updates(optimizer, on_done=lambda: done.append(True))
    optimizer.register_step_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    for p in params:
        p.grad = torch.ones(3)
    with SAFE_POINTS.installed(), pytest.raises(Interrupted):
        optimizer.step()
    assert done == [True]
    assert all(torch.equal(p.detach(), -torch.ones(3)) for p in params)
