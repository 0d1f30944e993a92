"""Trainer log-probs of the sampled tokens, the ``lp`` of ``example_trainer.loss``.

``lp_t = log_softmax(logits_t / T)[token_{t+1}]`` with ``T`` the rollout's temperature, so
the values compare with the log-probs vLLM served (``--logprobs-mode processed_logprobs``,
see docs/vllm-cpu.md). They are computed from the transformer body's last hidden states in
chunks of positions, each chunk checkpointed, so neither the ``[B, T, V]`` logits nor their
log_softmax ever exist at once (a 49k vocabulary dominates memory on small models).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def _temperatures(
    temperatures: torch.Tensor | float | None, B: int, device: torch.device
) -> torch.Tensor:
    if temperatures is None:
        return torch.ones(B, device=device)
    t = torch.as_tensor(temperatures, dtype=torch.float32, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"temperatures must be [B]={B}, got shape {tuple(t.shape)}")
    if (t <= 0).any():
        raise ValueError("temperatures must be > 0")
    return t


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or decoder is model:
        logger.debug("%s: get_decoder() unusable, using .model", type(model).__name__)
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise ValueError(f"cannot find the transformer body of {type(model).__name__}")
    return decoder


def _check_plain_head(model: torch.nn.Module) -> None:
    # The chunked path assumes logits = lm_head(hidden); refuse models that post-process.
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} sets config.{attr}; sampled_token_logprobs "
                "assumes logits = lm_head(hidden). Use naive_token_logprobs."
            )


def _chunk_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temps: torch.Tensor,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) hidden -> (N,) log-prob of targets and (N,) entropy (no grad, or empty)."""
    logits = head(hidden).float() / temps.unsqueeze(-1)  # (N, V)
    logp = torch.log_softmax(logits, dim=-1)
    out = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not want_entropy:
        return out, out.new_empty(0)
    with torch.no_grad():
        ent = -(logp.exp() * logp).sum(-1)
    return out, ent


def sampled_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperatures: torch.Tensor | float | None = None,
    *,
    chunk_size: int = 1024,
    return_entropy: bool = False,
    positions: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token, ``[B, T-1]``: ``out[:, t] = log p(ids[:, t+1] | ids[:, :t+1])``.

    Logits are divided by the per-sequence rollout temperature (``[B]``, default 1) before
    log_softmax, so they are comparable with vLLM's log-probs. The transformer body runs
    once; the lm_head + log_softmax run over ``chunk_size`` flattened positions at a time,
    each chunk under a non-reentrant checkpoint when grad is on, so backward stores only
    the hidden chunk and recomputes its logits: peak extra memory is one chunk's
    ``[chunk_size, V]`` instead of ``[B, T, V]``. Works with HF ``*ForCausalLM`` and peft
    models (LoRA layers live inside the body and head). With ``return_entropy`` also returns
    the per-token entropy of the tempered distribution (no grad).

    ``positions`` (``[B, T-1]``, nonzero where wanted: the loss mask) limits the lm_head to
    those positions; the others come back as 0 (entropy 0). The head over a 49k vocabulary
    costs about a quarter of a small model's step per position, and a short completion after
    a chat prompt leaves most positions (prompt, padding) out of the loss.

    Pad on the right: like ``model(...)``, the body derives positions from the token index,
    not from ``attention_mask``, so left padding shifts positions relative to vLLM.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_plain_head(model)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    B, T = input_ids.shape
    temps = _temperatures(temperatures, B, input_ids.device)

    body = _decoder(model)
    hidden = body(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state  # (B, T, H)
    H = hidden.shape[-1]
    flat_h = hidden[:, :-1].reshape(-1, H)  # (B*(T-1), H)
    flat_tgt = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    flat_temp = temps.unsqueeze(-1).expand(B, T - 1).reshape(-1).to(torch.float32)
    wanted: torch.Tensor | None = None
    if positions is not None:
        if positions.shape != (B, T - 1):
            raise ValueError(f"positions must be [B, T-1]={B, T - 1}, got shape "
                             f"{tuple(positions.shape)}")
        wanted = positions.reshape(-1).to(input_ids.device).nonzero().squeeze(1)
        flat_h, flat_tgt, flat_temp = (flat_h.index_select(0, wanted),
                                       flat_tgt.index_select(0, wanted),
                                       flat_temp.index_select(0, wanted))

    use_ckpt = torch.is_grad_enabled() and flat_h.requires_grad
    lps, ents = [], []
    for s in range(0, flat_h.shape[0], chunk_size):
        args = (
            head,
            flat_h[s : s + chunk_size],
            flat_tgt[s : s + chunk_size],
            flat_temp[s : s + chunk_size],
            return_entropy,
        )
        if use_ckpt:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    if wanted is not None:  # back to [B, T-1], 0 where not wanted
        def spread(values: list[torch.Tensor]) -> torch.Tensor:
            full = hidden.new_zeros(B * (T - 1), dtype=torch.float32)
            return (full.index_copy(0, wanted, torch.cat(values)) if values else full
                    ).view(B, T - 1)
        out = spread(lps)
        return (out, spread(ents).detach()) if return_entropy else out
    out = torch.cat(lps).view(B, T - 1) if lps else hidden.new_zeros(B, 0, dtype=torch.float32)
    if not return_entropy:
        return out
    ent = torch.cat(ents).view(B, T - 1) if ents else out.detach().clone()
    return out, ent


def naive_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperatures: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reference for ``sampled_token_logprobs``: full ``[B, T, V]`` logits -> log_softmax.

    Kept for tests and the benchmark; it holds the whole vocabulary distribution (and its
    gradient) for every position, which is what the chunked version avoids.
    """
    B = input_ids.shape[0]
    temps = _temperatures(temperatures, B, input_ids.device)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).logits  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1].float() / temps.view(B, 1, 1), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
