"""The micro-batch token budget: probed on CUDA from the memory left at start-up.

A fixed number of sequences per micro-batch either wastes memory on short batches or runs out
of it on long ones; a budget of padded tokens (see `Batch.token_micro_batches`) tracks what
activations actually cost. `--micro-batch-tokens -1` (auto) asks this module for the largest
budget that fits: trial forward+backward passes at doubling sizes until one runs out of
memory, then a safety margin below the largest that fitted. On CPU there is nothing to probe
(memory is not the limit a micro-batch is sized for), so auto falls back to
`--micro-batch-size`.
"""

from __future__ import annotations

import gc
import logging
import math
from typing import Any

import torch

from .config import TrainConfig
from .logprobs import sampled_token_logprobs

log = logging.getLogger(__name__)

GiB = 1 << 30

# Device bytes of optimizer state per trainable element, for optimizers whose state is not
# two moments in the parameter's dtype (the AdamW default below); see optim.py's table.
_STATE_BYTES_PER_ELEMENT = {"AdamW8bit": 2, "Adafactor": 0, "CPUOffloadAdamW": 0}


def pending_optimizer_state_bytes(optimizer: Any, device: torch.device) -> int:
    """Estimated bytes the first `optimizer.step()` will still allocate on `device`.

    Optimizers create their state lazily, so at start-up free memory does not yet show it;
    the probe holds this much back. Parameters that already have state (a resumed run) count
    nothing: that memory is already taken.
    """
    if optimizer is None:
        return 0
    per_element = _STATE_BYTES_PER_ELEMENT.get(type(optimizer).__name__)
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.device != device or optimizer.state.get(p):
                continue
            total += p.numel() * (2 * p.element_size() if per_element is None else per_element)
    return total


def _trial_fits(model: torch.nn.Module, sequences: int, seq_len: int, vocab: int,
                chunk_size: int, generator: torch.Generator) -> bool:
    """One forward+backward of `sequences` random sequences of `seq_len` tokens."""
    device = next(model.parameters()).device
    try:
        ids = torch.randint(0, vocab, (sequences, seq_len), device=device, generator=generator)
        logprobs, _ = sampled_token_logprobs(model, ids, torch.ones_like(ids),
                                             chunk_size=chunk_size, return_entropy=True)
        if logprobs.requires_grad:
            logprobs.sum().backward()
        torch.cuda.synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False  # the traceback (and the tensors it holds) dies with this frame


def probe_micro_batch_tokens(model: torch.nn.Module, seq_len: int, *,
                             optimizer: Any = None, max_tokens: int | None = None,
                             chunk_size: int = 1024, margin: float = 0.75,
                             reserve_bytes: int = 0) -> int:
    """Largest padded-token budget per micro-batch that fits the free memory of the model's
    CUDA device, times `margin`; 0 (split by sequence count) when the model is not on CUDA.

    Trials run `seq_len`-token sequences (the longest the run accepts, so attention is at its
    costliest), 1, 2, 4, ... of them, until one runs out of memory or the size reaches
    `max_tokens / margin` (default cap: 64 sequences). The margin leaves room for
    fragmentation from micro-batches of varying shapes. Memory that training will take but
    that does not exist yet is held back during the trials: `reserve_bytes` plus the state
    `optimizer` will allocate on its first step (`pending_optimizer_state_bytes`).
    Gradients from the trials stay allocated between trials (as they do between
    micro-batches) and are set to None at the end, so call this before training.
    The global RNG is left untouched (trial tokens and any dropout use forked state).
    Raises RuntimeError when not even one sequence fits.
    """
    device = next(model.parameters()).device
    if device.type != "cuda":
        log.info("micro-batch token probe: model is on %s, not CUDA; nothing to probe", device)
        return 0
    if seq_len < 2 or not 0 < margin <= 1:
        raise ValueError(f"need seq_len >= 2 and 0 < margin <= 1, got {seq_len}, {margin}")
    max_tokens = max_tokens or 64 * seq_len
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    reserve = reserve_bytes + pending_optimizer_state_bytes(optimizer, device)
    max_sequences = math.ceil(max_tokens / margin / seq_len)
    was_training = model.training
    model.train()
    fitted = 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]):
        generator = torch.Generator(device=device).manual_seed(0)
        try:
            ballast = torch.empty(reserve, dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError:
            ballast = None
        if ballast is None:
            raise RuntimeError(f"holding back {reserve / GiB:.2f} GiB for optimizer state "
                               "already exhausts GPU memory: use --optimizer adamw_cpu or "
                               "adamw_8bit, or a LoRA mode")
        sequences = 1
        while True:
            sequences = min(sequences, max_sequences)
            fits = _trial_fits(model, sequences, seq_len, vocab, chunk_size, generator)
            if not fits:
                gc.collect()
                torch.cuda.empty_cache()
                break
            fitted = sequences * seq_len
            if sequences == max_sequences:
                break
            sequences *= 2
        del ballast
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    torch.cuda.empty_cache()
    if not fitted:
        raise RuntimeError(f"one sequence of {seq_len} tokens does not fit in GPU memory "
                           "(forward+backward): try --grad-checkpointing, a smaller "
                           "--logprob-chunk-size or --max-token-len")
    budget = min(max_tokens, int(fitted * margin))
    free, total = torch.cuda.mem_get_info(device)
    log.info("micro-batch token budget: %d tokens (largest trial that fitted %d tokens of "
             "%d-token sequences, margin %.2f, %.2f GiB held back for optimizer state and "
             "reserve; %.1f of %.1f GiB free after the probe)", budget, fitted, seq_len, margin,
             reserve / GiB, free / GiB, total / GiB)
    return budget


def resolve_micro_batch_tokens(cfg: TrainConfig, model: torch.nn.Module,
                               optimizer: Any = None, *, reserve_bytes: int = 0) -> int:
    """`cfg.micro_batch_tokens` as the step uses it: a budget > 0, or 0 for splitting by
    `--micro-batch-size`; -1 (auto) probes on CUDA and means 0 elsewhere."""
    if cfg.micro_batch_tokens >= 0:
        return cfg.micro_batch_tokens
    device = next(model.parameters()).device
    if device.type != "cuda":
        log.info("--micro-batch-tokens auto: the trainer is on %s, so micro-batches keep "
                 "--micro-batch-size %d sequences", device, cfg.micro_batch_size)
        return 0
    return probe_micro_batch_tokens(model, cfg.max_token_len, optimizer=optimizer,
                                    max_tokens=cfg.batch_size * cfg.max_token_len,
                                    chunk_size=cfg.logprob_chunk_size,
                                    reserve_bytes=reserve_bytes)
