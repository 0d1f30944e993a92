"""legacy: serve each new policy by saving the full model and restarting vLLM on it.

The simplest way to keep vLLM in sync and the slowest: every sync pays a vLLM start-up
(~20 s on CPU, more with compilation). Trainer and vLLM each hold a full copy of the weights.
The environment keeps retrying while the server is down, so no rollout is lost.

    python -m example_trainer --mode legacy --model DIR --sync-every 2

This file is the template for your own mode: copy it, change the two blocks marked "vLLM
serves" and "sync", and run it with `--mode path/to/my_mode.py:train`. `TRAINS` says what the
mode trains ("full", or "lora" for an adapter: then LoRA flags apply and the run wraps the
model with peft). `DATA_PARALLEL = True` lets it run on several ranks under torchrun: keep it
only while the sync works from sharded parameters, as `run.save_served_weights` and the
built-in senders do, and talks to vLLM through the handle `run.serve` gives (trainer.py's
docstring). Everything else is shared code. A sync's duties, whatever moves the weights:

1. After the block, vLLM serves exactly the trainer's weights: `--parity-check` proves it
   after every sync (`run.sync` runs the probe), and every mode's end-to-end test uses it.
2. The new weight version is published (`run.sync` does it when the block succeeds), so
   environments tag their rollouts with the version they were sampled under.
3. A swap in place (same adapter name, or weights changed under a running server) must drop
   vLLM's prefix cache: its blocks are keyed by name, not by weights, and would keep serving
   KV computed with the old weights. A restart (this mode) starts with an empty cache.
4. Either pause generation around the swap (`--sync-pause wait`) or accept that running
   sequences mix two policies (`none`; their version tags say so).
5. With --restart-vllm-on-failure, register with `vllm.on_restart(fn)` whatever makes a
   fresh server serve the current weights (a new server knows no adapter and no process
   group); the run restarts the server and publishes the version after `fn`.
6. Change what vLLM serves only inside `run.sync`: the evaluation before training runs
   alongside the first steps, and `run.sync` waits for it first.
"""

from __future__ import annotations

from example_trainer.config import TrainConfig
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun, remove_dir

TRAINS = "full"  # or "lora": read by --mode before the run starts
DEFAULTS = {"lr": 3e-5, "sync_every": 4}  # tuned: a restart costs about two steps
DATA_PARALLEL = True  # runs under torchrun (FSDP2): its sync goes through run's helpers


def train(cfg: TrainConfig) -> dict:
    run = TrainingRun.setup(cfg, TRAINS)
    with run:  # on exit, however it happens: stop vLLM, tell the API, write the summary
        # --- vLLM serves a saved copy of the weights --------------------------------------
        served = run.save_served_weights(run.start_step)
        vllm = run.serve(served, restarts=True)

        run.evaluate("before")
        for step in run.steps():
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, run.step_config,
                                    run.scheduler)
            if run.sync_due(step):
                with run.sync(step, metrics):  # --- sync: save, restart on the new copy
                    previous, served = served, run.save_served_weights(step)
                    metrics["sync/vllm_startup_s"] = vllm.restart(served)
                    remove_dir(previous)
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
        run.evaluate("after")
    remove_dir(served)  # the final weights are in the last checkpoint
    return run.results
