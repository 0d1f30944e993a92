"""legacy: serve each new policy by saving the full model and restarting vLLM on it.

The simplest way to keep vLLM in sync and the slowest: every sync pays a vLLM start-up
(~20 s on CPU, more with compilation). Trainer and vLLM each hold a full copy of the weights.
The environment keeps retrying while the server is down, so no rollout is lost.

    python -m example_trainer --mode legacy --model DIR --sync-every 2

This file is the template for your own mode: copy it, change the block marked "sync", and
run it with `--mode path/to/my_mode.py:train`. Everything else is shared code.
"""

from __future__ import annotations

from example_trainer.config import ConfigError, TrainConfig
from example_trainer.step import grpo_step
from example_trainer.trainer import ParityProbe, TrainingRun, remove_dir


def train(cfg: TrainConfig) -> dict:
    if cfg.vllm_url:
        raise ConfigError("--mode legacy restarts vLLM itself, so it cannot use a server you "
                         "started (--vllm-url); use lora_hotswap or lora_nccl for that")
    run = TrainingRun.setup(cfg)
    with run:  # on exit, however it happens: stop vLLM, tell the API, write the summary
        # --- vLLM serves a saved copy of the weights --------------------------------------
        served = run.save_served_weights(run.start_step)
        vllm = run.start_vllm(served)
        probe = ParityProbe(run, vllm.client(), cfg.served_name) if cfg.parity_check else None

        run.evaluate(vllm.url, "before")
        for step in run.steps():
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, cfg, run.scheduler)
            if step % cfg.sync_every == 0 or step == cfg.steps:
                with run.recorder.timer("sync"):  # --- sync: save, restart on the new copy
                    previous, served = served, run.save_served_weights(step)
                    metrics["sync/vllm_startup_s"] = vllm.restart(served)
                    run.fetcher.publish_weight_version(step)
                    remove_dir(previous)
                if probe:
                    metrics |= probe.check()
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
        run.evaluate(vllm.url, "after")
    remove_dir(served)  # the final weights are in the last checkpoint
    return run.results
