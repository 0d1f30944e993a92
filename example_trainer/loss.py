"""Policy-gradient losses for GRPO / GSPO: pure functions of log-prob tensors.

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

``lp`` comes from ``example_trainer.logprobs.sampled_token_logprobs``; nothing here touches
a model.
"""

from __future__ import annotations

import torch

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
