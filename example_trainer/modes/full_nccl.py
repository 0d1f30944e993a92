"""full_nccl: train the full model; each sync sends every weight into vLLM's memory, no disk.

vLLM serves the model with a weight-transfer engine (`--weight-transfer-config`) and the
trainer drives vLLM's own weight-transfer API: it joins a process group with vLLM's
workers once, and each sync packs every parameter into buckets of `--sync-bucket-mib`,
broadcasts them (gloo on CPU through this project's `example_gloo` engine, vLLM's `nccl`
engine on GPU) and has vLLM load them in place (`example_trainer/weight_transfer.py`). On CPU
vLLM re-packs its linear weights after the load: that and the broadcast are the sync's
cost. The prefix cache is reset (its keys don't change with the weights); `--sync-pause
wait` (default) drains running requests first, `none` only freezes them during the update
(vLLM's model is half loaded between the start and the finish) and preempts them, so they
are recomputed under the new weights. Trainer
and vLLM each hold a full copy of the weights; during a sync the trainer holds one bucket
more.

    python -m example_trainer --mode full_nccl --model DIR --sync-bucket-mib 64

With --vllm-url, start your vLLM with VLLM_SERVER_DEV_MODE=1 and --weight-transfer-config
'{"backend": "example_gloo"}' on CPU (this package installed: its vLLM plugin registers the
engine) or '{"backend": "nccl"}' on GPU.
"""

from __future__ import annotations

import torch

from example_trainer.config import TrainConfig
from example_trainer.serving import VLLM
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun
from example_trainer.weight_sync import drop_stale_prefix_cache
from example_trainer.weight_transfer import (FullWeightSender, generation_paused,
                                             weight_transfer_options)

TRAINS = "full"  # or "lora": read by --mode before the run starts
DEFAULTS = {"lr": 3e-5}  # tuned (README, "Which mode learns fastest"); flags win
DATA_PARALLEL = True  # runs under torchrun (FSDP2): all ranks gather, rank 0 sends


def connect_weight_sender(run: TrainingRun, vllm: VLLM) -> FullWeightSender:
    """Join a weight-transfer group with vLLM's workers and send the current weights: at
    start (vLLM loaded the base model; a resumed run is ahead of it) and after a restart."""
    cfg = run.cfg
    workers = cfg.vllm_tensor_parallel_size if torch.cuda.is_available() else 1
    sender = FullWeightSender(vllm.client, run.model, bucket_mib=cfg.sync_bucket_mib,
                              timeout_s=cfg.sync_timeout, workers=workers,
                              host=cfg.sync_host)
    sender.join()
    run.children.callback(sender.close)  # LIFO: the group goes before vLLM stops
    with generation_paused(vllm.client, "none"):  # the environment may be sampling already
        sender.sync()
        drop_stale_prefix_cache(vllm.client, preempt_running=True)
    return sender


def train(cfg: TrainConfig) -> dict:
    run = TrainingRun.setup(cfg, TRAINS)
    with run:  # on exit, however it happens: stop vLLM, tell the API, write the summary
        # --- vLLM serves the model with a weight-transfer engine --------------------------
        vllm = run.serve(run.model_path, **weight_transfer_options(cfg))
        sender = connect_weight_sender(run, vllm)

        def resync() -> None:  # --restart-vllm-on-failure: the old group died with vLLM
            nonlocal sender
            sender.abandon()  # no rpc to a dead worker
            sender = connect_weight_sender(run, vllm)
        vllm.on_restart(resync)

        run.evaluate("before")
        for step in run.steps():
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, run.step_config,
                                    run.scheduler)
            if run.sync_due(step):
                with run.sync(step, metrics), generation_paused(vllm.client, cfg.sync_pause):
                    metrics |= sender.sync()  # --- sync: broadcast, load in place
                    drop_stale_prefix_cache(vllm.client,
                                            preempt_running=cfg.sync_pause == "none")
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
        run.evaluate("after")
    return run.results
