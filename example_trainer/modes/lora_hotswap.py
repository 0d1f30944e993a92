"""lora_hotswap: train a LoRA adapter; vLLM swaps in each new version over HTTP.

vLLM serves the frozen base model (as 'base') and the adapter under `--served-name`
('policy'), which is what the environment samples with. Each sync saves the adapter to a new
directory and re-registers the name: `POST /v1/unload_lora_adapter` then
`POST /v1/load_lora_adapter` (a few ms). With `--sync-pause wait` (default) vLLM is paused
around the swap, so no running sequence sees two adapters; a request that arrives during the
pause was already resolved to the previous adapter and runs on it (its `weight_version` tag
says so). With `none`, requests arriving between unload and load get a 404 and the
environment retries them. `load_inplace` is avoided on purpose: on vLLM 0.32 it sticks to
the request and the worker re-reads the adapter from disk on every engine step
(docs/vllm-cpu.md).

    python -m example_trainer --mode lora_hotswap --model DIR --lora-rank 8

Needs vLLM with runtime LoRA (the trainer starts it with --enable-lora and
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; with --vllm-url, start yours the same way).
"""

from __future__ import annotations

from example_trainer.config import TrainConfig
from example_trainer.serving import vllm_lora_options
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun, remove_dir
from example_trainer.vllm.client import VLLMClient

TRAINS = "lora"  # or "full": read by --mode before the run starts
# tuned: an adapter wants a far larger lr than full fine-tuning; at 2e-3 constant a
# 14-step run collapsed after step 10, so the rate decays (cosine) over the run
DEFAULTS = {"lr": 2e-3, "lr_schedule": "cosine"}
DATA_PARALLEL = True  # runs under torchrun (FSDP2): the adapter is gathered to rank 0

# Requests that vLLM resolved to an older version before a swap still load it from its
# directory when they run (a removed adapter is re-read from disk; a missing directory kills
# vLLM's engine, as measured): keep the current and the two previous directories.
KEEP_ADAPTER_DIRS = 3


def swap_adapter(client: VLLMClient, name: str, path, loaded: bool) -> None:
    """Point `name` at the adapter in `path` (vLLM refuses to load a name twice)."""
    if loaded:
        client.unload_lora_adapter(name)
    client.load_lora_adapter(name, str(path))


def train(cfg: TrainConfig) -> dict:
    run = TrainingRun.setup(cfg, TRAINS)
    with run:  # on exit, however it happens: stop vLLM, tell the API, write the summary
        # --- vLLM serves the base model; the adapter is loaded from disk by name ----------
        vllm = run.serve(run.model_path, **vllm_lora_options(run.cfg))
        adapters = [run.save_served_weights(run.start_step)]  # newest last
        swap_adapter(vllm.client, cfg.served_name, adapters[-1], loaded=False)
        vllm.on_restart(  # --restart-vllm-on-failure: a new server knows no adapter
            lambda: swap_adapter(vllm.client, cfg.served_name, adapters[-1], loaded=False))

        run.evaluate("before")
        for step in run.steps():
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, run.step_config,
                                    run.scheduler)
            if run.sync_due(step):
                with run.sync(step, metrics):  # --- sync: save, swap the name over HTTP
                    adapters.append(run.save_served_weights(step))
                    with vllm.client.paused(cfg.sync_pause):
                        swap_adapter(vllm.client, cfg.served_name, adapters[-1], loaded=True)
                    while len(adapters) > KEEP_ADAPTER_DIRS:
                        remove_dir(adapters.pop(0))
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
        run.evaluate("after")
    for path in adapters:  # the final adapter is in the last checkpoint
        remove_dir(path)
    return run.results
