"""A mode without vLLM that runs under torchrun (DATA_PARALLEL): the shared loop of every
mode minus the sync, for the sharded checkpoint and resume tests (tests/test_torchrun.py).

Run as `torchrun ... -m example_trainer --mode tests/torchrun_mode.py:train ...`.
"""

from __future__ import annotations

from example_trainer.config import TrainConfig
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun

TRAINS = "full"
DATA_PARALLEL = True


def train(cfg: TrainConfig) -> dict:
    run = TrainingRun.setup(cfg, TRAINS)
    with run:
        for step in run.steps():
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, run.step_config,
                                    run.scheduler)
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
    return run.results
