"""Data-parallel training on PyTorch's FSDP2 (`fully_shard` over a device mesh).

The pieces a run needs to train one model on several ranks started by `torchrun`;
`TrainingRun` (trainer.py) wires them in, so a mode file holds no distributed code. Only
modes that declare `DATA_PARALLEL = True` run on more than one rank: every mode but
shared_vllm. legacy and lora_hotswap write the served weights through
`run.save_served_weights`, which gathers the full model, or just the adapter, to rank 0;
lora_nccl's `AdapterBroadcaster` gathers the adapter into its send buckets and full_nccl's
sender gathers one tensor at a time into its buckets (vLLM's `ModuleSource`), every rank
together, and rank 0 alone sends.

* `init_distributed(cfg)` reads torchrun's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`,
  `MASTER_ADDR`, `MASTER_PORT`) and returns a `Dist` (process group, 1-D mesh "dp"; CUDA
  with NCCL or CPU with gloo), or None for a single process: then nothing here is used and
  training is exactly today's.
* `shard_model(model, cfg, dist)` applies `fully_shard` to every decoder layer and to the
  root, sums gradients across ranks (no average: the step's micro-batch weights are already
  relative to the global batch) and keeps fp32 sharded parameters with bf16 compute when
  training in bf16 (`MixedPrecisionPolicy`): FSDP's fp32 shards replace the master-weights
  wrapper of a single process. `adamw_cpu` becomes torch's AdamW over parameters FSDP keeps
  in CPU memory (`CPUOffloadPolicy`).
* `broadcast_batch` sends rank 0's batch (the trajectory API is rank 0's only) to all
  ranks; `distributed_step` trains this rank's share of its sequences with the weights of a
  single process on the whole batch and all-reduces the metrics, so parameters and the
  step line equal a single process's (`tests/test_distributed_step.py`).
* What rank 0 alone does, and how the other ranks follow it (the fetcher, vLLM's handle,
  failures and signals), is in ranks.py.
* `check_distributed_support(cfg, world_size)` refuses what cannot work at start-up.

Optimizers sharded (world size > 1): `adamw` yes; `adamw_cpu` yes, as torch's AdamW with
FSDP's `CPUOffloadPolicy`; `adafactor` no (transformers' Adafactor mixes plain state tensors
with DTensor parameters and fails; on local shards its column statistics would cover only
this rank's rows, not the matrix's); `adamw_8bit` no (bitsandbytes' kernels take plain
tensors, not DTensor shards, and its quantisation blocks would follow the shards).
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from .batch import Batch
from .config import ConfigError, TrainConfig
from .logprobs import sampled_token_logprobs
from .step import (BatchShare, StepConfig, accumulate_gradients, apply_update, model_device,
                   split_batch)

log = logging.getLogger(__name__)

# Optimizers that run on FSDP2's DTensor shards (see the module docstring).
SHARDED_OPTIMIZERS = ("adamw", "adamw_cpu")


@dataclass(frozen=True)
class Dist:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, 1-D, named "dp"
    processes: tuple[tuple[str, int], ...] = ()  # (host name, pid) of every rank

    def lost_ranks(self) -> list[int]:
        """Ranks on this machine whose process has died (SIGKILL, a crash, the OOM killer):
        what a collective failing on a closed connection most often means. Ranks on other
        machines cannot be checked from here (their node's torchrun reports them)."""
        import psutil
        host, lost = socket.gethostname(), []
        for rank, (where, pid) in enumerate(self.processes):
            if where != host or rank == self.rank:
                continue
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    continue  # alive
            except psutil.NoSuchProcess:
                pass
            lost.append(rank)
        return lost

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that talks to the API, vLLM and the log."""
        return self.rank == 0

    def barrier(self, timeout: float | None = None) -> None:
        """Wait for every rank. With `timeout` (seconds) on gloo, `monitored_barrier`: a rank
        that does not arrive in time fails the barrier with an error naming it."""
        if timeout is not None and self.backend == "gloo":
            torch_dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout),
                                         wait_all_ranks=True)
        else:
            torch_dist.barrier()

    def close(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE, 1 when unset (a plain `python -m example_trainer`)."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1")


def init_distributed(cfg: TrainConfig, *, even_alone: bool = False) -> Dist | None:
    """The process group torchrun described, or None for a single process.

    CUDA ranks use NCCL on `cuda:LOCAL_RANK`; CPU ranks (``--device cpu``, or no CUDA)
    use gloo. Refuses unsupported combinations first (`check_distributed_support`).
    `even_alone`: a one-rank group too (FSDP2 on one device, for the benchmark and the GPU
    tests that a machine with one GPU can run), given torchrun's RANK and MASTER_* variables.
    """
    world = world_size_from_env()
    if world <= 1 and not (even_alone and "RANK" in os.environ):
        return None
    check_distributed_support(cfg, world)
    if cfg.optimizer not in SHARDED_OPTIMIZERS:  # a one-rank group (even_alone) too
        raise ConfigError(f"--optimizer {cfg.optimizer} cannot run on FSDP2's sharded "
                          f"parameters; use {' or '.join(SHARDED_OPTIMIZERS)}")
    from torch.distributed.device_mesh import init_device_mesh
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend, rank=rank, world_size=world,
                                      device_id=device if use_cuda else None,
                                      timeout=collective_timeout(cfg))
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    processes: list[Any] = [None] * world  # to name a rank that dies (Dist.lost_ranks)
    torch_dist.all_gather_object(processes, (socket.gethostname(), os.getpid()))
    log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return Dist(rank, world, local_rank, device, backend, mesh,
                tuple(tuple(p) for p in processes))


def collective_timeout(cfg: TrainConfig) -> datetime.timedelta:
    """How long a collective may wait: the other ranks wait in one while rank 0 alone waits
    for a batch (--batch-timeout) or restarts vLLM (--vllm-startup-timeout), plus
    --sync-timeout; never below torch's default of 30 minutes."""
    seconds = cfg.batch_timeout + cfg.vllm_startup_timeout + cfg.sync_timeout
    return datetime.timedelta(seconds=max(seconds, 1800.0))


def mode_runs_sharded(mode: str) -> bool:
    """The mode file's `DATA_PARALLEL = True`, read from its source without running it (like
    TRAINS): the mode's sync works from sharded parameters."""
    import ast
    from .cli import _mode_source, _module_constant
    node = _module_constant(_mode_source(mode), "DATA_PARALLEL")
    return isinstance(node, ast.Constant) and node.value is True


def check_distributed_support(cfg: TrainConfig, world_size: int) -> None:
    """Raise ConfigError (one line: why, and what to use) for what cannot run sharded."""
    if world_size <= 1:
        return
    if cfg.mode == "shared_vllm":
        raise ConfigError(
            f"shared_vllm cannot run on {world_size} ranks: its trainer parameters are "
            "views of the one copy of the weights vLLM serves on one device, and FSDP shards "
            "them across ranks; use full_nccl (full weights in memory, the closest), legacy or "
            "a LoRA mode, or shared_vllm as one process")
    if not mode_runs_sharded(cfg.mode):
        raise ConfigError(
            f"--mode {cfg.mode} does not run on {world_size} ranks yet: its sync is not wired "
            "to FSDP2's sharded parameters (a mode that is declares DATA_PARALLEL = True); "
            "use a built-in mode (--mode legacy, full_nccl, lora_hotswap or lora_nccl), or "
            f"run {cfg.mode} as one process (no torchrun; ./run.sh --nproc 1)")
    if cfg.restart_vllm_on_failure and cfg.mode in ("lora_nccl", "full_nccl"):
        raise ConfigError(
            f"--restart-vllm-on-failure does not work with {cfg.mode} on {world_size} ranks: "
            "rank 0 alone would rejoin vLLM's weight-sync group while the other ranks wait "
            "in the next step; drop the flag (a failure then checkpoints, and --resume "
            "continues) or run as one process")
    if cfg.optimizer not in SHARDED_OPTIMIZERS:
        why = {"adamw_8bit": "bitsandbytes' 8-bit kernels take plain tensors, not FSDP's "
                             "DTensor shards",
               "adafactor": "Adafactor's factored statistics need whole matrices, and "
                            "transformers' implementation fails on DTensor shards"}
        raise ConfigError(
            f"--optimizer {cfg.optimizer} cannot run sharded ({world_size} ranks): "
            f"{why.get(cfg.optimizer, 'not tested with FSDP2')}; use "
            f"{' or '.join(SHARDED_OPTIMIZERS)} (sharding already divides the optimizer "
            "state by the number of ranks)")


# ---------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------

def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model (peft-wrapped or not): the modules whose
    class the model names in `_no_split_modules` (LlamaDecoderLayer, Qwen2DecoderLayer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder-layer class in "
                         "_no_split_modules: shard_model needs a Hugging Face causal LM "
                         "(Llama, Qwen2, ...)")
    return layers


def _low_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    from .model import resolve_dtype
    dtype = resolve_dtype(cfg, device)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def shard_model(model: torch.nn.Module, cfg: TrainConfig, dist: Dist, *,
                reshard_after_forward: bool | int | None = None) -> torch.nn.Module:
    """`fully_shard` each decoder layer, then the root; returns the (same) model.

    Needs a Hugging Face causal LM whose `_no_split_modules` names its decoder-layer class
    (Llama, Qwen2; a peft model is sharded through its base model's layers, frozen and
    trainable parameters in the same units) with its weights on `dist.device` or CPU, and
    its tied embedding / lm_head (if tied) owned by the root, which is how HF builds them.

    * Gradients are summed across ranks (`set_gradient_divide_factor(1.0)` with sum-only
      collectives, which gloo needs too): each rank's loss is already weighted by its share
      of the global batch.
    * bf16/fp16 training (`--dtype auto` on CUDA): parameters are cast to fp32 before
      sharding and `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` gathers them
      in bf16 for compute; the optimizer updates the fp32 shards, so no master-weights
      wrapper is needed (`build_optimizer` sees fp32 parameters and wraps nothing).
    * `adamw_cpu`: `CPUOffloadPolicy` (sharded parameters, gradients and the optimizer step
      in CPU memory, pinned on CUDA); the optimizer is then torch's AdamW
      (`build_sharded_optimizer`).
    * `reshard_after_forward`: FSDP2's own option, passed through (None: its default, True
      for the layers; the root keeps its parameters for backward).
    """
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                        OffloadPolicy, fully_shard)
    options: dict[str, Any] = {"mesh": dist.mesh}
    low = _low_precision(cfg, dist.device)
    if low is not None:
        model.to(torch.float32)
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    if cfg.optimizer == "adamw_cpu":
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=dist.device.type == "cuda")
    else:
        options["offload_policy"] = OffloadPolicy()
    if reshard_after_forward is not None:
        options["reshard_after_forward"] = reshard_after_forward
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # The step computes log-probs from the body and a chunked head, not model.forward; FSDP
    # gathers the root's parameters (embeddings, final norm, lm_head) and reduces their
    # gradients in the root's forward hooks, so the step runs through the root (step.py).
    model.step_logprobs = functools.partial(_root_logprobs, model)
    # grpo_step trains this rank's share of each batch (distributed_step) on such a model.
    model.data_parallel = dist
    log.info("sharded %s over %d ranks (%s%s)", type(model).__name__, dist.world_size,
             f"{low} compute, fp32 shards" if low is not None else "fp32",
             ", CPU offload" if cfg.optimizer == "adamw_cpu" else "")
    return model


def _root_logprobs(model: torch.nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, temperatures: torch.Tensor | None,
                   *, chunk_size: int, return_entropy: bool = False,
                   positions: torch.Tensor | None = None) -> Any:
    """`sampled_token_logprobs` run as the root module's forward, so FSDP's root hooks fire.

    Temperatures travel in the closure, not as a forward input: FSDP casts floating inputs
    to the compute dtype, and a bf16 temperature would change the log-probs."""
    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        out = sampled_token_logprobs(model, input_ids, attention_mask, temperatures,
                                     chunk_size=chunk_size, return_entropy=return_entropy,
                                     positions=positions)
        # Not views (B*(T-1) floats): FSDP warns that an in-place op on a view it returns
        # would skip its pre-backward hook.
        return tuple(t.clone() for t in out) if return_entropy else out.clone()

    model.forward = forward
    try:
        return model(input_ids, attention_mask)
    finally:
        del model.forward  # the class's forward again


def build_sharded_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer over a sharded model's (fp32 DTensor) parameters.

    `adamw_cpu` is torch's AdamW here: FSDP's CPUOffloadPolicy already keeps the shards,
    their gradients and so the optimizer state in CPU memory. Others come from the registry.
    """
    from .optim import build_optimizer
    name = "adamw" if cfg.optimizer == "adamw_cpu" else cfg.optimizer
    return build_optimizer(name, model.parameters(), cfg.lr, weight_decay=cfg.weight_decay,
                           master_weights=None if cfg.master_weights == "auto" else False)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------

def broadcast_object(dist: Dist, obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (pickled; tensors should be on CPU)."""
    box = [obj if dist.is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_batch(dist: Dist, batch: Batch | None) -> Batch | None:
    """Rank 0 fetched `batch` (None: no more data); every rank returns the same batch."""
    return broadcast_object(dist, batch.to("cpu") if dist.is_main and batch is not None
                            else None)


def rank_rows(batch_size: int, world_size: int, rank: int) -> list[int]:
    """This rank's sequences: contiguous blocks, the first `batch_size % world_size` ranks
    one longer (a rank has none when the batch is smaller than the world)."""
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def micro_batch_count(batch: Batch, rows: list[int], step_cfg: StepConfig) -> int:
    """Micro-batches a rank owning `rows` runs (every rank can count every rank's)."""
    return len(list(split_batch(batch.rows(rows), step_cfg))) if rows else 0


def batch_share(batch: Batch, rank: int, world_size: int, step_cfg: StepConfig
                ) -> tuple[Batch | None, BatchShare]:
    """This rank's part of `batch` and what its micro-batch weights are relative to.

    Every rank runs as many forward/backward passes as the busiest rank (each pass gathers
    the sharded parameters collectively); a rank with fewer micro-batches makes up the
    difference with zero-loss passes over the batch's shortest sequence.
    """
    rows = rank_rows(batch.size, world_size, rank)
    passes = max(micro_batch_count(batch, rank_rows(batch.size, world_size, r), step_cfg)
                 for r in range(world_size))
    shortest = min(range(batch.size), key=lambda i: (batch.lengths[i], i))
    share = BatchShare(sequences=batch.size, tokens=batch.num_tokens,
                       padded_len=batch.loss_mask.shape[1], passes=passes,
                       filler=batch.rows([shortest]))
    return (batch.rows(rows) if rows else None), share


def reduce_metrics(dist: Dist, metrics: dict[str, float]) -> dict[str, float]:
    """Sum the ranks' metrics (each already relative to the global batch), maxima as maxima;
    a key a rank lacks (no sequences) counts as absent there. Same result on every rank."""
    gathered: list[dict[str, float]] = [{} for _ in range(dist.world_size)]
    torch_dist.all_gather_object(gathered, metrics)
    out: dict[str, float] = {}
    for part in gathered:  # rank order: the same float sums everywhere
        for key, value in part.items():
            if key.endswith("_max"):
                out[key] = max(out.get(key, -math.inf), value)
            else:
                out[key] = out.get(key, 0.0) + value
    return out


def distributed_step(model: torch.nn.Module, optimizer: Any, batch: Batch, dist: Dist,
                     step_cfg: StepConfig, scheduler: Any = None) -> dict[str, float]:
    """One optimizer update of a sharded model from the whole `batch` (the same on every
    rank): the update and metrics a single process gets from `grpo_step` on that batch."""
    part, share = batch_share(batch, dist.rank, dist.world_size, step_cfg)
    local = accumulate_gradients(model, part, step_cfg, optimizer, share=share)
    metrics = reduce_metrics(dist, local)
    return {**metrics, **apply_update(model, optimizer, step_cfg, scheduler)}


def full_tensor(param: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The whole of a parameter, gathered if sharded (a collective: every rank calls it).
    A shard FSDP2 keeps in CPU memory (`--optimizer adamw_cpu`) is gathered on `device`, the
    rank's (NCCL gathers only device memory). Pass it from a thread of one's own: there a
    bare "cuda" means cuda:0, not the rank's GPU."""
    if not hasattr(param, "full_tensor"):
        return param
    target = device if device is not None else torch.device(param.device_mesh.device_type)
    if param.device.type != target.type:
        param = param.to(target)
    return param.full_tensor()


def gather_full_state_dict(model: torch.nn.Module, *, trainable_only: bool = False
                           ) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, in CPU memory (empty on other ranks): for
    syncing a sharded model's weights to vLLM or saving it in Hugging Face format.
    `trainable_only`: just the parameters that train (a LoRA adapter, not the frozen base),
    gathered one by one: torch's `ignore_frozen_params` still gathers a tied lm_head (the
    embedding matrix, larger than the adapter) because it is no named parameter of its own."""
    if trainable_only:
        keep = torch_dist.get_rank() == 0
        device = model_device(model)  # the rank's, wherever the shards live
        adapter = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                full = full_tensor(param, device)
                if keep:
                    adapter[name] = full.detach().to("cpu", copy=True)
        return adapter
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


__all__ = ["Dist", "SHARDED_OPTIMIZERS", "batch_share", "broadcast_batch", "broadcast_object",
           "build_sharded_optimizer", "check_distributed_support", "collective_timeout",
           "decoder_layers", "distributed_step", "full_tensor", "gather_full_state_dict",
           "init_distributed",
           "mode_runs_sharded", "rank_rows", "reduce_metrics", "shard_model",
           "world_size_from_env"]
