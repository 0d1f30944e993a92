"""Policy-gradient losses for GRPO / GSPO and the log-probs they consume.

Notation, per token t of sequence i (tensors are ``[B, T]`` unless noted):
``lp`` trainer log-prob of the sampled token (logits / rollout temperature, then
log_softmax), ``old`` the rollout's inference log-prob (from vLLM), ``m`` the loss mask
(1 on generated tokens), ``A`` the advantage (``[B]`` per sequence or ``[B, T]`` per token),
``sg[x]`` stop-gradient (``x.detach()``), ``n_i = sum_t m_it``.

Ratios (``level``)::

    token           (GRPO)        r_it = exp(lp_it - old_it)
    sequence        (GSPO)        r_it = s_i = exp(sum_t m_it (lp_it - old_it) / n_i)
    sequence_token  (GSPO-token)  r_it = sg[s_i] * exp(lp_it - sg[lp_it])

``sequence_token`` has the value of ``sequence`` but its gradient reaches each token through
that token's own log-prob only; with a per-sequence advantage both give the same gradient,
with per-token advantages they differ (Zheng et al. 2025, GSPO).

Per-token loss (the same ``min`` for both signs of A; the pessimistic bound)::

    l_it = -min(r_it * A_it, clip(r_it, 1 - eps_low, 1 + eps_high) * A_it)
           + kl_coef * k3_it,      k3_it = exp(ref_it - lp_it) - (ref_it - lp_it) - 1

The clipped branch is the active one (zero gradient) exactly when A > 0 and
r > 1 + eps_high, or A < 0 and r < 1 - eps_low.

Normalisation (``norm``)::

    sequence  (GRPO)      L = (1/B) sum_i [ sum_t m_it l_it / max(n_i, 1) ]
    token     (DAPO)      L = sum_it m_it l_it / max(sum_it m_it, 1)
    constant  (Dr. GRPO)  L = sum_it m_it l_it / (B * T)

Group advantage::

    A_i = (R_i - mean_group(R)) / (std_group(R) + eps)     (population std)
    A_i =  R_i - mean_group(R)                              (Dr. GRPO, std_norm=False)

Trainer log-probs are computed from the transformer body's last hidden states in chunks of
positions, each chunk checkpointed, so neither the ``[B, T, V]`` logits nor their
log_softmax ever exist at once (a 49k vocabulary dominates memory on small models).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_token")
NORMS: tuple[str, ...] = ("sequence", "token", "constant")


# --------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------


def _check_shapes(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    named = {"old_logprobs": old_logprobs, "mask": mask}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, t in named.items():
        if t.shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)} "
                "(the shape of logprobs)"
            )
    B = logprobs.shape[0]
    if advantages.shape not in ((B,), logprobs.shape):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected ({B},) or "
            f"{tuple(logprobs.shape)}"
        )


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    norm: str = "sequence",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss (formulas in the module docstring) and its metrics.

    Positions where ``mask`` is 0 never influence the loss, its gradient or the metrics,
    whatever ``logprobs``/``old_logprobs`` hold there (the API puts 1.0 on prompt
    positions). With ``norm="sequence"`` a sequence without any masked token contributes 0
    but still counts in the batch mean over ``B`` (so the loss scale does not depend on how
    many sequences happen to be empty).

    Returns ``(loss, metrics)``: a scalar tensor with grad and a dict of floats with
    ``policy/`` keys: ratio_mean, clip_low_frac, clip_high_frac, kl, logprob_gap_mean,
    logprob_gap_max, loss.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(
            f"kl_coef={kl_coef} needs ref_logprobs (reference-policy log-probs, [B, T]); "
            "pass them or set kl_coef=0"
        )
    _check_shapes(logprobs, old_logprobs, advantages, mask, ref_logprobs)

    B, T = logprobs.shape
    m = mask.to(logprobs.dtype)
    on = m > 0
    zeros = torch.zeros_like(logprobs)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1) broadcasts over T

    # Masked-out positions get a log-ratio of 0 via where() (not m * x): 0 * inf would be NaN.
    log_ratio = torch.where(on, logprobs - old_logprobs, zeros)  # (B, T)
    n_seq = m.sum(-1)  # (B,)
    if level == "token":
        ratio = torch.exp(log_ratio)
    else:
        seq_log_ratio = log_ratio.sum(-1) / n_seq.clamp(min=1.0)  # (B,)
        if level == "sequence":
            ratio = torch.exp(seq_log_ratio).unsqueeze(-1).expand(B, T)
        else:  # sequence_token: value s_i, gradient d s_it / d lp_it = s_i
            lp_on = torch.where(on, logprobs, zeros)
            ratio = torch.exp(seq_log_ratio.detach()).unsqueeze(-1) * torch.exp(
                lp_on - lp_on.detach()
            )

    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, T)

    k3 = None
    if ref_logprobs is not None:
        d = torch.where(on, ref_logprobs - logprobs, zeros)
        k3 = torch.exp(d) - d - 1.0
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * k3

    per_token = torch.where(on, per_token, zeros)
    if norm == "sequence":
        loss = (per_token.sum(-1) / n_seq.clamp(min=1.0)).mean()
    elif norm == "token":
        loss = per_token.sum() / m.sum().clamp(min=1.0)
    else:  # constant
        loss = per_token.sum() / (B * T)

    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        r = ratio.detach()
        a = adv.expand(B, T)
        low = on & (a < 0) & (r < 1.0 - eps_low)
        high = on & (a > 0) & (r > 1.0 + eps_high)
        gap = torch.where(on, (logprobs - old_logprobs).abs(), zeros)
        gap_max = gap.max() if gap.numel() else gap.new_zeros(())
        kl = (k3 * m).sum() / n if k3 is not None else gap.new_zeros(())
        values = torch.stack(
            [(r * m).sum() / n, low.sum() / n, high.sum() / n, kl, gap.sum() / n, gap_max,
             loss.detach()]
        ).tolist()  # one device sync for all metrics
    keys = ("ratio_mean", "clip_low_frac", "clip_high_frac", "kl", "logprob_gap_mean",
            "logprob_gap_max", "loss")
    metrics = {f"policy/{k}": float(v) for k, v in zip(keys, values)}
    return loss, metrics


# --------------------------------------------------------------------------------------
# Group advantages
# --------------------------------------------------------------------------------------


def group_advantages(
    scores: torch.Tensor,
    *,
    std_norm: bool = True,
    eps: float = 1e-6,
    mean: float | torch.Tensor | None = None,
    std: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages ``(R - mean) / (std + eps)`` over the last dim.

    ``std`` is the population std (unbiased=False). ``std_norm=False`` skips the division
    (Dr. GRPO). ``mean``/``std`` replace the group statistics when only part of a group is
    at hand (the server then supplies the whole group's); with ``std_norm=True`` they must
    come together, since a partial group's own std is not the group's. A group whose scores
    are all equal (or whose supplied std is 0) carries no signal and gets exact zeros,
    not rounding noise divided by eps.
    """
    scores = scores if scores.is_floating_point() else scores.float()
    if std_norm and (mean is None) != (std is None):
        raise ValueError("with std_norm=True, pass both mean and std overrides or neither")
    if mean is None:
        mu = scores.mean(-1, keepdim=True)
        sigma = scores.std(-1, unbiased=False, keepdim=True)
        no_signal = (scores == scores[..., :1]).all(-1, keepdim=True)
    else:
        mu = torch.as_tensor(mean, dtype=scores.dtype, device=scores.device)
        sigma = torch.as_tensor(
            0.0 if std is None else std, dtype=scores.dtype, device=scores.device
        )
        # Without a std override (std_norm=False) we cannot tell whether the group is flat.
        no_signal = (sigma == 0) if std is not None else torch.zeros((), dtype=torch.bool)
    adv = scores - mu
    if std_norm:
        adv = adv / (sigma + eps)
    return torch.where(no_signal.to(scores.device), torch.zeros_like(adv), adv)


# --------------------------------------------------------------------------------------
# Trainer log-probs of the sampled tokens
# --------------------------------------------------------------------------------------


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
