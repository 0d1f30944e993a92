"""One GRPO/GSPO optimizer update from a Batch, shared by every mode.

`grpo_step` = `accumulate_gradients` (forward/backward over micro-batches) followed by
`apply_update` (clip, optimizer step, schedule, zero the gradients). The two halves are
separate so a mode can act between them, e.g. pause the inference server whose weights
`optimizer.step()` writes in place.

Micro-batches are weighted so that accumulated gradients equal those of the whole batch under
each normalisation, however the batch is split: `policy_loss` normalises within its
micro-batch, and the weight rescales that to the batch (sequence: share of sequences; token:
share of trained tokens; constant: share of the batch's B*T, where T is the whole batch's
padded length, so the constant is the same for every micro-batch).

Optional optimizer hooks (duck-typed, for optimizers that keep gradients or state off the
accelerator, such as a CPU-offload AdamW):

* ``optimizer.last_backward()`` returns a context manager; the last micro-batch's
  ``backward()`` runs inside it (so the optimizer can move gradients as they are produced).
* ``optimizer.clip_grad_norm_(max_norm)`` returns the total norm (float or tensor) and clips
  the gradients it holds; used instead of ``torch.nn.utils.clip_grad_norm_``.

Data parallel (`distributed.py`): a rank trains its part of the batch with a `BatchShare`
(the whole batch's figures, so weights and metrics are relative to the whole and the ranks'
gradients and metrics sum to the single-process ones), and a sharded model may provide
``model.step_logprobs(input_ids, attention_mask, temperatures, chunk_size=...,
return_entropy=...)``, used instead of `sampled_token_logprobs` (FSDP must run the root
module's forward).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .batch import Batch
from .config import TrainConfig
from .logprobs import sampled_token_logprobs
from .loss import policy_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepConfig:
    """Exactly what one training step reads; built from the run's TrainConfig.

    ``micro_batch_tokens`` > 0 splits each batch by a padded-token budget and ignores
    ``micro_batch_size``; 0 splits by ``micro_batch_size`` sequences. The "auto" value of
    the CLI (-1) must be resolved before building a StepConfig
    (`microbatch.resolve_micro_batch_tokens`); `from_config` treats an unresolved -1 as 0.
    """

    level: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    norm: str = "sequence"
    kl_coef: float = 0.0
    logprob_chunk_size: int = 1024
    micro_batch_size: int = 4
    micro_batch_tokens: int = 0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.micro_batch_tokens < 0:
            raise ValueError("micro_batch_tokens must be resolved to >= 0 (0: split by "
                             f"micro_batch_size), got {self.micro_batch_tokens}")

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, micro_batch_tokens: int | None = None
                    ) -> "StepConfig":
        """The step's fields of `cfg`; `micro_batch_tokens` overrides the config's value
        (pass the probed budget when the config says -1, auto)."""
        eps_low, eps_high = cfg.clip_eps
        tokens = cfg.micro_batch_tokens if micro_batch_tokens is None else micro_batch_tokens
        return cls(level=cfg.level, eps_low=eps_low, eps_high=eps_high, norm=cfg.norm,
                   kl_coef=cfg.kl_coef, logprob_chunk_size=cfg.logprob_chunk_size,
                   micro_batch_size=cfg.micro_batch_size, micro_batch_tokens=max(tokens, 0),
                   max_grad_norm=cfg.max_grad_norm)


def as_step_config(cfg: StepConfig | TrainConfig) -> StepConfig:
    """Accept a whole TrainConfig while callers move to StepConfig."""
    return cfg if isinstance(cfg, StepConfig) else StepConfig.from_config(cfg)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the forward runs: a sharded model's rank device, which is not where its
    parameters live under FSDP2's CPU offload (`--optimizer adamw_cpu`)."""
    data_parallel = getattr(model, "data_parallel", None)
    return data_parallel.device if data_parallel is not None else next(model.parameters()).device


@dataclass(frozen=True)
class BatchShare:
    """The whole batch, seen from a data-parallel rank that trains only part of it.

    Micro-batch weights and metric shares are taken relative to these figures (sequences,
    trained tokens, padded target length T-1), not the part's own. `passes`: forward/backward
    passes to run at least (every rank of a sharded model must run the same number, since
    each gathers parameters collectively); missing ones forward `filler` (one sequence) with
    a zero loss, and count in no metric.
    """

    sequences: int
    tokens: int
    padded_len: int
    passes: int = 0
    filler: Batch | None = None

    @classmethod
    def of(cls, batch: Batch) -> "BatchShare":
        return cls(batch.size, batch.num_tokens, batch.loss_mask.shape[1])


def token_logprobs(model: torch.nn.Module, mb: Batch, chunk_size: int,
                   return_entropy: bool = False, *, loss_positions_only: bool = True) -> Any:
    """Sampled-token log-probs of a micro-batch, through ``model.step_logprobs`` when the
    model provides one (a sharded model; module docstring). Only the loss mask's positions
    get the lm_head (the others are 0) unless `loss_positions_only` is False: a pass that
    must reach every parameter whatever its mask."""
    positions = mb.loss_mask if loss_positions_only else None
    compute = getattr(model, "step_logprobs", None)
    if compute is None:
        return sampled_token_logprobs(model, mb.input_ids, mb.attention_mask,
                                      mb.temperatures, chunk_size=chunk_size,
                                      return_entropy=return_entropy, positions=positions)
    return compute(mb.input_ids, mb.attention_mask, mb.temperatures, chunk_size=chunk_size,
                   return_entropy=return_entropy, positions=positions)


def split_batch(batch: Batch, step_cfg: StepConfig) -> Iterator[Batch]:
    """The micro-batches of one step: by token budget when set, else by sequence count."""
    if step_cfg.micro_batch_tokens > 0:
        return batch.token_micro_batches(step_cfg.micro_batch_tokens)
    return batch.micro_batches(step_cfg.micro_batch_size)


def reference_logprobs(model: torch.nn.Module, mb: Batch, chunk_size: int) -> torch.Tensor:
    """KL reference: the base model (adapter disabled) for peft models, else the batch's own."""
    if hasattr(model, "disable_adapter"):
        with torch.no_grad(), model.disable_adapter():
            return token_logprobs(model, mb, chunk_size)
    if mb.ref_logprobs is None:
        raise ValueError("--kl-coef > 0 needs a reference policy: use a LoRA mode (the base "
                         "model is the reference) or an environment that posts ref_logprobs")
    return mb.ref_logprobs


def _micro_weight(norm: str, mb: Batch, whole: BatchShare) -> float:
    if norm == "sequence":
        return mb.size / whole.sequences
    if norm == "token":
        return mb.num_tokens / whole.tokens if whole.tokens else 0.0
    return (mb.size * mb.loss_mask.shape[1]) / (whole.sequences * whole.padded_len)


def accumulate_gradients(model: torch.nn.Module, batch: Batch | None, step_cfg: StepConfig,
                         optimizer: Any = None, *, share: BatchShare | None = None
                         ) -> dict[str, float]:
    """Forward/backward over the micro-batches, adding the whole batch's gradient to `.grad`.

    `optimizer` is only consulted for its optional `last_backward()` context (module
    docstring). Returns the policy metrics (weighted like the loss, maxima as maxima) and
    the batch's own figures. With `share`, `batch` is a data-parallel rank's part of a
    larger batch (None: no sequences on this rank) and every weight and additive metric is
    relative to the whole, so the ranks' gradients and metrics sum to the whole batch's.
    """
    model.train()
    device = model_device(model)
    whole = share or BatchShare.of(batch)
    sums: dict[str, float] = defaultdict(float)
    maxima: dict[str, float] = {}
    micro_batches = list(split_batch(batch, step_cfg)) if batch is not None else []
    real = len(micro_batches)
    if share is not None and share.passes > real:
        micro_batches += [share.filler] * (share.passes - real)
    last_backward = getattr(optimizer, "last_backward", None)
    for index, mb in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        context = (last_backward() if is_last and last_backward is not None
                   else contextlib.nullcontext())
        if index >= real:  # a pass only to match the other ranks': zero gradient
            logprobs = token_logprobs(model, mb.to(device), step_cfg.logprob_chunk_size,
                                      loss_positions_only=False)
            with context:
                (logprobs.nan_to_num() * 0.0).sum().backward()
            continue
        weight = _micro_weight(step_cfg.norm, mb, whole)  # on CPU: no sync
        mb = mb.to(device)
        logprobs, entropy = token_logprobs(  # (b, t) each
            model, mb, step_cfg.logprob_chunk_size, return_entropy=True)
        # Environments that report no inference log-probs train on-policy (ratio 1).
        old = torch.where(torch.isnan(mb.old_logprobs), logprobs.detach(), mb.old_logprobs)
        ref = (reference_logprobs(model, mb, step_cfg.logprob_chunk_size)
               if step_cfg.kl_coef else None)
        loss, metrics = policy_loss(logprobs, old, mb.advantages, mb.loss_mask,
                                    level=step_cfg.level, eps_low=step_cfg.eps_low,
                                    eps_high=step_cfg.eps_high, norm=step_cfg.norm,
                                    ref_logprobs=ref, kl_coef=step_cfg.kl_coef)
        with context:
            (loss * weight).backward()
        metrics["policy/entropy"] = float((entropy * mb.loss_mask).sum() /
                                          mb.loss_mask.sum().clamp(min=1))
        seq_share = mb.size / whole.sequences
        for key, value in metrics.items():
            if key.endswith("_max"):
                maxima[key] = max(maxima.get(key, -math.inf), value)
            else:
                sums[key] += value * (weight if key == "policy/loss" else seq_share)
    if share is None:
        return {**sums, **maxima, "train/tokens": float(whole.tokens),
                "train/reward_mean": float(batch.scores.mean()),
                "train/sequences": float(batch.size),
                "train/micro_batches": float(len(micro_batches))}
    # This rank's contributions: summed over the ranks they give the whole batch's figures.
    return {**sums, **maxima,
            "train/tokens": float(batch.num_tokens) if batch is not None else 0.0,
            "train/reward_mean": (float(batch.scores.sum()) / share.sequences
                                  if batch is not None else 0.0),
            "train/sequences": float(batch.size) if batch is not None else 0.0,
            "train/micro_batches": float(real)}


def apply_update(model: torch.nn.Module, optimizer: Any, step_cfg: StepConfig,
                 scheduler: Any = None) -> dict[str, float]:
    """Clip the accumulated gradient, step (skipped when its norm is not finite), advance the
    schedule (skipped steps included, so the schedule follows the step count) and zero the
    gradients."""
    max_norm = step_cfg.max_grad_norm if step_cfg.max_grad_norm > 0 else math.inf
    clip = getattr(optimizer, "clip_grad_norm_", None)
    if clip is not None:
        grad_norm = float(clip(max_norm))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # Sharded (DTensor) gradients give a DTensor norm: the global one, once gathered.
        grad_norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    skipped = not math.isfinite(grad_norm)
    if skipped:
        log.warning("non-finite gradient norm (%s): skipping this optimizer step", grad_norm)
    else:
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    if scheduler is not None:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" on a skip
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"train/grad_norm": grad_norm, "train/lr": lr, "train/skipped": float(skipped)}


def grpo_step(model: torch.nn.Module, optimizer: Any, batch: Batch,
              step_cfg: StepConfig | TrainConfig, scheduler: Any = None) -> dict[str, float]:
    """One optimizer update from `batch`: `accumulate_gradients` then `apply_update`.

    A TrainConfig is still accepted (converted with `StepConfig.from_config`) while callers
    move to building one StepConfig per run. A model sharded by `distributed.shard_model`
    (it carries its `data_parallel` Dist) trains this rank's share of `batch`, the same on
    every rank, with the update and metrics of one process (`distributed_step`).
    """
    step_cfg = as_step_config(step_cfg)
    dist = getattr(model, "data_parallel", None)
    if dist is not None:
        from .distributed import distributed_step  # distributed imports this module
        return distributed_step(model, optimizer, batch, dist, step_cfg, scheduler)
    metrics = accumulate_gradients(model, batch, step_cfg, optimizer)
    return {**metrics, **apply_update(model, optimizer, step_cfg, scheduler)}
