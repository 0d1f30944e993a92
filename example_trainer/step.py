"""One GRPO/GSPO optimizer update from a Batch, shared by every mode.

Micro-batches are weighted so that accumulated gradients equal those of the whole batch under
each normalisation: `policy_loss` normalises within its micro-batch, and the weight rescales
that to the batch (sequence: share of sequences; token: share of trained tokens; constant:
share of the batch's B*T).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from typing import Any

import torch

from .batch import Batch
from .config import TrainConfig
from .loss import policy_loss, sampled_token_logprobs

log = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def reference_logprobs(model: torch.nn.Module, mb: Batch, chunk_size: int) -> torch.Tensor:
    """KL reference: the base model (adapter disabled) for peft models, else the batch's own."""
    if hasattr(model, "disable_adapter"):
        with torch.no_grad(), model.disable_adapter():
            return sampled_token_logprobs(model, mb.input_ids, mb.attention_mask,
                                          mb.temperatures, chunk_size=chunk_size)
    if mb.ref_logprobs is None:
        raise ValueError("--kl-coef > 0 needs a reference policy: use a LoRA mode (the base "
                         "model is the reference) or an environment that posts ref_logprobs")
    return mb.ref_logprobs


def _micro_weight(norm: str, mb: Batch, batch: Batch, batch_tokens: int) -> float:
    if norm == "sequence":
        return mb.size / batch.size
    if norm == "token":
        return mb.num_tokens / batch_tokens if batch_tokens else 0.0
    return (mb.size * mb.loss_mask.shape[1]) / (batch.size * batch.loss_mask.shape[1])


def grpo_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
              cfg: TrainConfig, scheduler: Any = None) -> dict[str, float]:
    """Forward/backward over micro-batches, clip the gradient norm, step; returns metrics."""
    model.train()
    device = model_device(model)
    eps_low, eps_high = cfg.clip_eps
    batch_tokens = batch.num_tokens
    sums: dict[str, float] = defaultdict(float)
    maxima: dict[str, float] = {}
    for mb in batch.micro_batches(cfg.micro_batch_size):
        mb = mb.to(device)
        logprobs, entropy = sampled_token_logprobs(  # (b, t) each
            model, mb.input_ids, mb.attention_mask, mb.temperatures,
            chunk_size=cfg.logprob_chunk_size, return_entropy=True)
        # Environments that report no inference log-probs train on-policy (ratio 1).
        old = torch.where(torch.isnan(mb.old_logprobs), logprobs.detach(), mb.old_logprobs)
        ref = reference_logprobs(model, mb, cfg.logprob_chunk_size) if cfg.kl_coef else None
        loss, metrics = policy_loss(logprobs, old, mb.advantages, mb.loss_mask,
                                    level=cfg.level, eps_low=eps_low, eps_high=eps_high,
                                    norm=cfg.norm, ref_logprobs=ref, kl_coef=cfg.kl_coef)
        weight = _micro_weight(cfg.norm, mb, batch, batch_tokens)
        (loss * weight).backward()
        metrics["policy/entropy"] = float((entropy * mb.loss_mask).sum() /
                                          mb.loss_mask.sum().clamp(min=1))
        share = mb.size / batch.size
        for key, value in metrics.items():
            if key.endswith("_max"):
                maxima[key] = max(maxima.get(key, -math.inf), value)
            else:
                sums[key] += value * (weight if key == "policy/loss" else share)

    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    skipped = not math.isfinite(grad_norm)
    if skipped:
        log.warning("non-finite gradient norm (%s): skipping this optimizer step", grad_norm)
    else:
        optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    if scheduler is not None:
        with contextlib.suppress(UserWarning):
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {**sums, **maxima, "train/grad_norm": grad_norm, "train/lr": lr,
            "train/skipped": float(skipped), "train/tokens": float(batch_tokens),
            "train/reward_mean": float(batch.scores.mean()),
            "train/sequences": float(batch.size)}
