"""A mode without vLLM for the interruption tests: the shared loop of every mode, minus the sync.

Run as `python -m example_trainer --mode tests/reliability_mode.py:train ...`. Environment
variables place faults at exact points of the loop, so a real signal lands where the test
needs it:

  REL_PROGRESS            file that gets one line "N" after each completed step
  REL_PAUSE_AFTER_FETCH   step whose batch, once taken from the API, is held untrained: the
                          mode writes REL_PROGRESS + ".paused" and sleeps until signalled
  REL_SIGNAL_IN_UPDATE    step during whose optimizer update the process sends itself SIGTERM
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from example_trainer.config import TrainConfig
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun

TRAINS = "full"


def train(cfg: TrainConfig) -> dict:
    progress = Path(os.environ["REL_PROGRESS"]) if os.environ.get("REL_PROGRESS") else None
    pause_at = int(os.environ.get("REL_PAUSE_AFTER_FETCH", "0"))
    signal_at = int(os.environ.get("REL_SIGNAL_IN_UPDATE", "0"))
    run = TrainingRun.setup(cfg)
    current = {"step": 0}
    if signal_at:
        def kill_myself_mid_update(*_: object) -> None:
            if current["step"] == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)  # lands inside optimizer.step()
        run.optimizer.register_step_pre_hook(kill_myself_mid_update)
    with run:
        for step in run.steps():
            current["step"] = step
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            if step == pause_at and progress is not None:
                Path(f"{progress}.paused").write_text(str(step))
                time.sleep(120)  # the test's signal ends this
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, cfg, run.scheduler)
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
            if progress is not None:
                with open(progress, "a") as handle:
                    handle.write(f"{step}\n")
    return run.results
