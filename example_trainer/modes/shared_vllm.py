"""shared_vllm: the trainer's parameters are vLLM's own weights; nothing is transferred.

vLLM loads the model; its worker extension `SharedWeightsExporter` exports every weight
tensor (one shared-memory file on CPU, CUDA IPC handles on GPU) and the trainer builds the
Hugging Face model on the meta device with each parameter a view of vLLM's tensors
(`example_trainer/shared_weights.py`). `optimizer.step()` then updates the served model in
place. Generation is paused around every step (`/pause?mode=wait`, `/resume`) so that no
request mixes old and new weights; on CPU vLLM multiplies from packed copies of its linear
weights, which it re-packs before resuming: that re-pack is this mode's sync cost (on GPU
there is none). A start-up parity check proves the mapping before the first step. The
optimizer states are the trainer's own memory (`--optimizer adamw_cpu` keeps them off the
GPU); training runs in the dtype vLLM serves (fp32 on CPU, bf16 on GPU by default).

    python -m example_trainer --mode shared_vllm --model DIR

Needs one machine, one device, tensor parallel size 1 and a Llama or Qwen2 model. With
--vllm-url, start your vLLM with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls
example_trainer.vllm.shared_weights.SharedWeightsExporter. In the benchmark, train_s includes
sync_s: the sync runs inside `optimizer.step()`.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from example_trainer.config import TrainConfig
from example_trainer.model import resolve_device, resolve_model_path
from example_trainer.parity import check_parity, default_probe_tokens
from example_trainer.shared_weights import EXTENSION, SharedWeights
from example_trainer.step import grpo_step
from example_trainer.trainer import ParityProbe, TrainingRun, pin_trainer_cores, start_vllm
from example_trainer.vllm.client import VLLMClient
from example_trainer.vllm.server import HealthWatch

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict:
    if cfg.sync_every != 1:
        log.warning("shared_vllm: every optimizer step updates vLLM in place; --sync-every "
                    "%d has no effect", cfg.sync_every)
    model_path = resolve_model_path(cfg.model)
    device = resolve_device(cfg)
    with contextlib.ExitStack() as vllm_lifetime:  # vLLM stops after the run has closed
        # --- vLLM loads the weights; the trainer's model becomes a view of them -----------
        if cfg.vllm_url:
            vllm_url = cfg.vllm_url
        else:
            if device.type == "cpu" and not torch.cuda.is_available():
                pin_trainer_cores({0})  # VLLMServer binds vLLM's worker to core 0 on CPU
            dtype = {} if cfg.dtype == "auto" else {"dtype": cfg.dtype}
            server = start_vllm(cfg, model_path, worker_extension_cls=EXTENSION, **dtype)
            vllm_lifetime.callback(server.stop)
            vllm_url = server.url
        client = VLLMClient(vllm_url)
        weights = SharedWeights.attach(client, model_path, device)
        vllm_lifetime.callback(weights.close)  # finish an update an error cut short
        run = TrainingRun.setup(cfg, load=weights.load)
        if not cfg.vllm_url:  # a dead server fails the wait for data at once
            run.fetcher.watchdogs.append(HealthWatch(vllm_url, server=server,
                                                     timeout_s=cfg.sync_timeout))

        # --- sync: optimizer.step() writes vLLM's weights in place, so generation pauses
        #     around it; vLLM-CPU then re-packs its GEMM copies (no-op on GPU) and resumes
        def pause(*_):  # optimizer pre-hook
            with run.recorder.timer("sync"):
                weights.pause()

        def publish(*_):  # optimizer post-hook; `step` is the loop's, below
            with run.recorder.timer("sync"):
                weights.repack()
                run.fetcher.publish_weight_version(step)
                weights.resume()

        run.optimizer.register_step_pre_hook(pause)
        run.optimizer.register_step_post_hook(publish)

        with run:  # on exit, however it happens: tell the API, write the summary
            run.results["startup_parity_max_abs"] = check_parity(  # proves the mapping
                run.model, client, default_probe_tokens(run.tokenizer),
                atol=cfg.parity_atol, served_model=cfg.served_name)
            probe = ParityProbe(run, client, cfg.served_name) if cfg.parity_check else None

            run.evaluate(vllm_url, "before")
            for step in run.steps():
                with run.recorder.timer("data"):
                    batch = run.fetcher.next_batch()
                with run.recorder.timer("train"):  # includes the paused, in-place update
                    metrics = grpo_step(run.model, run.optimizer, batch, cfg, run.scheduler)
                metrics |= weights.pop_stats()
                if probe:
                    metrics |= probe.check()
                run.recorder.log(step, metrics)
                run.checkpoints.maybe_save(step, cfg.steps, **run.state())
            run.evaluate(vllm_url, "after")
    return run.results
