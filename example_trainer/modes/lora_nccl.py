"""lora_nccl: train a LoRA adapter; each sync broadcasts it into vLLM's memory, no disk.

vLLM serves the frozen base model (as 'base') and the adapter under `--served-name`
('policy'). The name is registered once from disk (`/v1/load_lora_adapter`: the OpenAI layer
only knows adapters registered that way). The adapter's parameters live in flat buckets
(one per dtype); each sync broadcasts them over a process group shared with vLLM's worker
(gloo on CPU, NCCL on GPU) and the worker extension `LoRAReceiver` copies them into the
adapter's active LoRA slot (or rebuilds the LoRA model from them) under the same id; the
same sync resets the prefix cache, because its keys don't change with an in-memory swap
(docs/vllm-cpu.md, docs/lora-slot-plan.md). `--sync-pause wait` (default) drains running
requests first, so no sequence mixes two policies; `none` swaps between engine steps while
requests run (running ones are preempted and recomputed under the new weights). Either way
the new weight version is published to the API and environments tag their groups with it.

    python -m example_trainer --mode lora_nccl --model DIR --lora-rank 8

With --vllm-url, start your vLLM with --enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True,
VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls
example_trainer.vllm.worker_extension.LoRAReceiver.
"""

from __future__ import annotations

import torch

from example_trainer.config import TrainConfig
from example_trainer.serving import VLLM, vllm_lora_options
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun, remove_dir
from example_trainer.weight_sync import EXTENSION, AdapterBroadcaster

TRAINS = "lora"  # or "full": read by --mode before the run starts
# tuned: an adapter wants a far larger lr than full fine-tuning; at 2e-3 constant a
# 14-step run collapsed after step 10, so the rate decays (cosine) over the run
DEFAULTS = {"lr": 2e-3, "lr_schedule": "cosine"}
DATA_PARALLEL = True  # runs under torchrun (FSDP2): rank 0 sends the adapter all ranks gather


def connect_adapter_sender(run: TrainingRun, vllm: VLLM) -> AdapterBroadcaster:
    """Join a weight-sync group with vLLM's worker, register the adapter's name from disk
    once and send the current adapter: at start, and again after a vLLM restart."""
    cfg = run.cfg
    workers = cfg.vllm_tensor_parallel_size if torch.cuda.is_available() else 1
    sender = AdapterBroadcaster(vllm.client, run.model, cfg.served_name, workers=workers,
                                backend=cfg.lora_sync_backend, timeout_s=cfg.sync_timeout,
                                host=cfg.sync_host)
    sender.join()  # before registering: the worker then sees the registration
    run.children.callback(sender.close)  # LIFO: the group goes before vLLM stops
    initial = run.save_served_weights(run.start_step)  # the only write to disk
    vllm.client.load_lora_adapter(cfg.served_name, str(initial))
    sender.sync()  # from now on an LRU reload gets the in-memory copy, not the dir
    remove_dir(initial)
    return sender


def train(cfg: TrainConfig) -> dict:
    run = TrainingRun.setup(cfg, TRAINS)
    with run:  # on exit, however it happens: stop vLLM, tell the API, write the summary
        # --- vLLM serves the base model with our worker extension -------------------------
        vllm = run.serve(run.model_path, **vllm_lora_options(run.cfg),
                         worker_extension_cls=EXTENSION)
        sender = connect_adapter_sender(run, vllm)

        def resync() -> None:  # --restart-vllm-on-failure: the old group died with vLLM
            nonlocal sender
            sender.abandon()  # no rpc to a dead worker
            sender = connect_adapter_sender(run, vllm)
        vllm.on_restart(resync)

        run.evaluate("before")
        for step in run.steps():
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, run.step_config,
                                    run.scheduler)
            if run.sync_due(step):
                with run.sync(step, metrics), vllm.client.paused(cfg.sync_pause):
                    # --- sync: broadcast, swap in memory, reset the prefix cache
                    metrics |= sender.sync(preempt_running=cfg.sync_pause == "none")
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
        run.evaluate("after")
    return run.results
