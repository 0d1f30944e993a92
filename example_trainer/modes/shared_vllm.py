"""shared_vllm: the trainer's parameters are vLLM's own weights; nothing is transferred.

vLLM loads the model; its worker extension `SharedWeightsExporter` exports every weight
tensor (one shared-memory file on CPU, CUDA IPC handles on GPU) and the trainer builds the
Hugging Face model on the meta device with each parameter a view of vLLM's tensors
(`example_trainer/shared_weights.py`, docs/shared-weights.md). The optimizer update then
changes the served model in place, so the sync is the update itself: generation pauses
around it (`/pause?mode=wait`, `/resume`) so that no request mixes old and new weights, and
on CPU vLLM multiplies from packed copies of its linear weights, which it re-packs before
resuming: that re-pack is this mode's sync cost (on GPU there is none). A start-up parity
check proves the mapping before the first step. The optimizer states are the trainer's own
memory (`--optimizer adamw_cpu` keeps them off the GPU); training runs in the dtype vLLM
serves (fp32 on CPU, bf16 on GPU by default, with fp32 master weights in the optimizer).

    python -m example_trainer --mode shared_vllm --model DIR

Needs one machine, one device, tensor parallel size 1 and a Llama or Qwen2 model. With
--vllm-url, start your vLLM with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls
example_trainer.vllm.shared_weights.SharedWeightsExporter. Every step syncs (--sync-every
does not apply); its sync_s includes the optimizer update.
"""

from __future__ import annotations

from example_trainer.config import TrainConfig
from example_trainer.model import resolve_model_path
from example_trainer.parity import check_parity, default_probe_tokens
from example_trainer.serving import VLLM
from example_trainer.shared_weights import SharedWeights, vllm_options
from example_trainer.step import accumulate_gradients, apply_update
from example_trainer.trainer import TrainingRun

TRAINS = "full"  # or "lora": read by --mode before the run starts
DEFAULTS = {"lr": 3e-5}  # tuned (README, "Which mode learns fastest"); flags win


def train(cfg: TrainConfig) -> dict:
    # --- vLLM loads the weights; the trainer's model becomes a view of them ---------------
    vllm = VLLM.open(cfg, resolve_model_path(cfg.model), **vllm_options(cfg))
    weights = SharedWeights.deferred(vllm.client, resolve_model_path(cfg.model))
    run = TrainingRun.setup(cfg, TRAINS, load=weights.load, vllm=vllm)
    with run:  # on exit, however it happens: stop vLLM, tell the API, write the summary
        run.children.callback(weights.close)  # LIFO: resume a paused server before it stops
        run.results["startup_parity_max_abs"] = check_parity(  # proves the mapping
            run.model, vllm.client, default_probe_tokens(run.tokenizer),
            atol=cfg.parity_atol, served_model=cfg.served_name)

        run.evaluate("before")
        for step in run.steps():
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = accumulate_gradients(run.model, batch, run.step_config,
                                               run.optimizer)
            with run.sync(step, metrics), weights.updating():  # --- sync: update in place
                metrics |= apply_update(run.model, run.optimizer, run.step_config,
                                        run.scheduler)
            metrics |= weights.pop_stats()
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
        run.evaluate("after")
    return run.results
