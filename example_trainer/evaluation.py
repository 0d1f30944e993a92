"""Held-out accuracy through vLLM, scored by the environment's own verifier.

The only place a training run touches `environments/`: the evaluation set and the scorer
belong to the task, so the run borrows them from the environment class named by --eval-env
instead of keeping a second copy of the task here.
"""

from __future__ import annotations

import importlib
import logging
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from .background import in_background
from .config import TrainConfig

log = logging.getLogger(__name__)


def held_out_accuracy(cfg: TrainConfig, vllm_url: str, tokenizer: Any,
                      model_path: str) -> float | None:
    """Accuracy on `--eval-size` held-out problems sampled at `--eval-temperature`; None
    when evaluation is off (`--eval-size 0` or no `--eval-env`)."""
    if not cfg.eval_env or cfg.eval_size <= 0:
        return None
    module, _, name = cfg.eval_env.partition(":")
    env_cls = getattr(importlib.import_module(module), name)
    from environments.base import EnvConfig
    env = env_cls(EnvConfig(vllm_url=vllm_url, model_name=cfg.served_name,
                            tokenizer=model_path, max_tokens=cfg.eval_max_tokens),
                  tokenizer=tokenizer)
    return env.evaluate(env.eval_items(cfg.eval_size, seed=cfg.seed),
                        temperature=cfg.eval_temperature)


class Evaluations:
    """A run's held-out evaluations and the learning curve they make (`results`:
    `eval_curve` points of step, training seconds so far, accuracy and evaluation seconds
    kept off the clock; `eval_before` / `eval_after`; `wall_s` and `eval_s` at the end).

    One evaluation may run in the background (the one before training, while the first
    steps train: the trainer's core would idle while vLLM evaluates); `finish_pending`
    waits for it, and only that wait is kept off the clock. `score()` gives the accuracy
    (None: evaluation is off); `restarts()` counts vLLM restarts, since a restart while an
    evaluation runs serves newer weights and voids its figure."""

    def __init__(self, cfg: TrainConfig, recorder: Any, results: dict[str, Any],
                 score: Callable[[], float | None], restarts: Callable[[], int],
                 wall_seconds: Callable[[], float]) -> None:
        self.cfg, self.recorder, self.results = cfg, recorder, results
        self.score, self.restarts, self.wall_seconds = score, restarts, wall_seconds
        self.pending: tuple[Future, str, int, float, int] | None = None

    def run(self, when: str, step: int, *, background: bool = False) -> float | None:
        """Evaluate now ("before", "after" or "step N", at `step`), or start it in the
        background; returns the accuracy (None if in the background or off)."""
        self.finish_pending()
        train_s = self.recorder.training_seconds()
        if background:
            log.info("evaluating %d held-out problems while the first steps train",
                     self.cfg.eval_size)
            self.pending = (in_background(self._timed_score, "evaluation"), when, step,
                            train_s, self.restarts())
            return None
        with self.recorder.apart():
            accuracy, eval_s = self._timed_score()
        return self._record(when, step, train_s, accuracy, eval_s)

    def finish_pending(self) -> None:
        """Wait for the evaluation running in the background, if one does; its `eval_s`
        is the wait (the part of it the run's clock did not overlap)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        measured, when, step, train_s, restarts = pending
        waited = time.perf_counter()
        with self.recorder.apart():
            try:
                accuracy, eval_s = measured.result()
            except Exception as err:
                raise RuntimeError(f"the held-out evaluation {when} training (run alongside "
                                   f"the first steps) failed: {err}") from err
        waited = time.perf_counter() - waited
        if self.restarts() != restarts:
            log.warning("no held-out accuracy %s training: vLLM was restarted (and given the "
                        "current weights) while it evaluated", when)
            return
        log.info("the %s evaluation took %.0f s alongside training; the run waited %.0f s "
                 "for it", when, eval_s, waited)
        self._record(when, step, train_s, accuracy, waited)

    def _timed_score(self) -> tuple[float | None, float]:
        t0 = time.perf_counter()
        accuracy = self.score()
        return accuracy, time.perf_counter() - t0

    def _record(self, when: str, step: int, train_s: float, accuracy: float | None,
                eval_s: float) -> float | None:
        if accuracy is None:
            return None
        curve = self.results.setdefault("eval_curve", [])
        curve.append({"step": step, "train_s": round(train_s, 2), "accuracy": accuracy,
                      "eval_s": round(eval_s, 2)})
        if when in ("before", "after"):
            self.results[f"eval_{when}"] = accuracy
        if when == "after":  # the figure a first run is judged by: start to final answer
            self.results["wall_s"] = round(self.wall_seconds(), 1)
            self.results["eval_s"] = round(sum(p["eval_s"] for p in curve), 1)
        log.info("held-out accuracy %s%s: %.3f (%d problems, T=%.1f)", when,
                 " training" if when in ("before", "after") else "", accuracy,
                 self.cfg.eval_size, self.cfg.eval_temperature)
        if when == "after" and len(curve) > 1:
            plot_learning_curve(curve, Path(self.cfg.save_path) / "accuracy.png",
                                title=self.cfg.mode)
        return accuracy


def plot_learning_curve(curve: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Held-out accuracy against training seconds (evaluation time excluded) as a PNG, the
    picture a user wants from a first run; skipped with a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s (pip install 'example-trainer[bench]')",
                 path.name)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_accuracy(ax, curve)
    ax.set_xlabel("training wall time, s (evaluation excluded; labels: step)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"learning curve: {title}" if title else "learning curve", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("learning curve written to %s", path)


def draw_accuracy(ax: Any, curve: list[dict[str, Any]], *, x: str = "train_s",
                  label: str | None = None, **style: Any) -> None:
    """One learning curve on matplotlib axes `ax`, accuracy against the seconds in key `x`,
    each point labelled with its step: a run's accuracy.png and the mode comparison's
    learning.png (one curve per mode) draw it the same way."""
    ax.plot([p[x] for p in curve], [p["accuracy"] for p in curve], label=label,
            **{"marker": "o", **style})
    for point in curve:
        ax.annotate(str(point["step"]), (point[x], point["accuracy"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
