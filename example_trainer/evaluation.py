"""Held-out accuracy through vLLM, scored by the environment's own verifier.

The only place a training run touches `environments/`: the evaluation set and the scorer
belong to the task, so the run borrows them from the environment class named by --eval-env
instead of keeping a second copy of the task here.
"""

from __future__ import annotations

import importlib
import logging
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
