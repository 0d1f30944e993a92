"""Held-out accuracy through vLLM, scored by the environment's own verifier.

The only place a training run touches `environments/`: the evaluation set and the scorer
belong to the task, so the run borrows them from the environment class named by --eval-env
instead of keeping a second copy of the task here.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

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
