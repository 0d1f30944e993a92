"""Hand-computed checks for example_trainer.loss (arithmetic written out in comments).

Conventions used below: old = -1.0 everywhere and lp = old + log(r), so exp(lp - old) = r
exactly (up to float rounding). eps_low = eps_high = 0.2, so clip range is [0.8, 1.2].
"""

from __future__ import annotations

import math

import pytest
import torch

from example_trainer.loss import (
    LEVELS,
    NORMS,
    group_advantages,
    policy_loss,
)

ATOL = 1e-6


def _lp_from_ratios(ratios: list[list[float]], old: float = -1.0):
    """(lp leaf with grad, old) such that exp(lp - old) == ratios."""
    r = torch.tensor(ratios, dtype=torch.float64)
    old_t = torch.full_like(r, old)
    lp = (old_t + r.log()).requires_grad_()
    return lp, old_t


def _lp_from_log_ratios(log_ratios: list[list[float]], old: float = -1.0):
    d = torch.tensor(log_ratios, dtype=torch.float64)
    old_t = torch.full_like(d, old)
    return (old_t + d).requires_grad_(), old_t


def _close(actual, expected, atol=ATOL):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


RATIOS = [[1.1, 0.7, 1.5], [1.1, 0.7, 1.5]]
ONES = torch.ones(2, 3, dtype=torch.float64)


# ---------------------------------------------------------------- token level (GRPO)


def test_token_level_both_signs_and_clip_regions():
    # A = [+1, -2] (per sequence), ratios r = [1.1, 0.7, 1.5] in both sequences.
    # seq 0, A=+1:
    #   r=1.1: r*A=1.1, clip(1.1)*A=1.1  -> min 1.1  -> l=-1.1, grad -A*r = -1.1
    #   r=0.7: r*A=0.7, clip=0.8 -> 0.8   -> min 0.7  -> l=-0.7, unclipped, grad -0.7
    #   r=1.5: r*A=1.5, clip=1.2 -> 1.2   -> min 1.2  -> l=-1.2, clipped (high), grad 0
    # seq 1, A=-2:
    #   r=1.1: r*A=-2.2, clip*A=-2.2      -> min -2.2 -> l=2.2,  grad -A*r = 2.2
    #   r=0.7: r*A=-1.4, clip=0.8 -> -1.6 -> min -1.6 -> l=1.6,  clipped (low), grad 0
    #          (the seed's `max` for A<0 would give -1.4 -> l=1.4: this catches it)
    #   r=1.5: r*A=-3.0, clip=1.2 -> -2.4 -> min -3.0 -> l=3.0,  unclipped, grad 3.0
    # norm "token": sum l = -1.1-0.7-1.2+2.2+1.6+3.0 = 3.8; / 6 tokens = 0.633333
    lp, old = _lp_from_ratios(RATIOS)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, met = policy_loss(lp, old, adv, ONES, level="token", norm="token")
    _close(loss, 3.8 / 6)
    loss.backward()
    _close(lp.grad, [[-1.1 / 6, -0.7 / 6, 0.0], [2.2 / 6, 0.0, 3.0 / 6]])
    # metrics: ratio mean (1.1+0.7+1.5)*2/6 = 1.1; one low-clip and one high-clip of 6.
    _close(met["policy/ratio_mean"], 1.1)
    _close(met["policy/clip_low_frac"], 1 / 6)
    _close(met["policy/clip_high_frac"], 1 / 6)
    _close(met["policy/loss"], 3.8 / 6)
    _close(met["policy/kl"], 0.0)
    # |lp-old| = |ln 1.1|, |ln 0.7|, |ln 1.5| = 0.0953102, 0.3566749, 0.4054651
    _close(met["policy/logprob_gap_mean"], (0.0953102 + 0.3566749 + 0.4054651) / 3, atol=1e-6)
    _close(met["policy/logprob_gap_max"], 0.4054651, atol=1e-6)
    assert all(isinstance(v, float) for v in met.values())


def test_token_level_norms_with_mask():
    # Same data, A = [+1, -2], mask [[1,1,0],[1,0,0]]; the masked tokens (l=-1.2, 1.6,
    # 3.0 from the test above) must not count. Masked losses: seq0 -1.1, -0.7; seq1 2.2.
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    # sequence: seq0 (-1.1-0.7)/2 = -0.9; seq1 2.2/1 = 2.2; mean over B=2 -> 0.65
    # token:    (-1.1-0.7+2.2) / 3 = 0.4/3 = 0.133333
    # constant: 0.4 / (B*T = 6) = 0.066667
    expected = {"sequence": 0.65, "token": 0.4 / 3, "constant": 0.4 / 6}
    # grads: -A*r / (per-token divisor); sequence divisor is n_i * B = 4 (seq0), 2 (seq1)
    grads = {
        "sequence": [[-1.1 / 4, -0.7 / 4, 0.0], [2.2 / 2, 0.0, 0.0]],
        "token": [[-1.1 / 3, -0.7 / 3, 0.0], [2.2 / 3, 0.0, 0.0]],
        "constant": [[-1.1 / 6, -0.7 / 6, 0.0], [2.2 / 6, 0.0, 0.0]],
    }
    for norm in NORMS:
        lp, old = _lp_from_ratios(RATIOS)
        loss, met = policy_loss(lp, old, adv, mask, level="token", norm=norm)
        _close(loss, expected[norm])
        loss.backward()
        _close(lp.grad, grads[norm])
    # metrics only over masked tokens: ratios 1.1, 0.7, 1.1 -> mean 2.9/3; no clipping
    # (0.7 has A>0, unclipped branch); gap max |ln 0.7| = 0.3566749 (not the masked ln 1.5).
    _close(met["policy/ratio_mean"], 2.9 / 3)
    _close(met["policy/clip_low_frac"], 0.0)
    _close(met["policy/clip_high_frac"], 0.0)
    _close(met["policy/logprob_gap_max"], 0.3566749, atol=1e-6)


def test_empty_sequence_counts_in_batch_mean_and_masked_garbage_is_ignored():
    # seq1 fully masked and full of garbage (old=1.0 as the API sends on prompts, lp=-inf).
    # sequence norm: seq0 (-1.1-0.7-1.2)/3 = -1.0; seq1 contributes 0 but counts: -1.0/2
    lp, old = _lp_from_ratios(RATIOS)
    with torch.no_grad():
        old[1] = 1.0
    lp_data = lp.detach().clone()
    lp_data[1] = -float("inf")
    lp = lp_data.requires_grad_()
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for level in LEVELS:
        lp.grad = None
        loss, met = policy_loss(lp, old, adv, mask, level=level, norm="sequence")
        if level == "token":
            _close(loss, -0.5)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(lp.grad).all()
        _close(lp.grad[1], [0.0, 0.0, 0.0])
        assert all(math.isfinite(v) for v in met.values())
    # an all-empty batch: loss 0, metrics 0, no NaN
    loss, met = policy_loss(lp, old, adv, torch.zeros_like(mask), norm="token")
    _close(loss, 0.0)
    assert met["policy/ratio_mean"] == 0.0


def test_per_token_advantages_and_broadcast_equivalence():
    # A = [[1, -1, 0.5], [-2, 2, 0]], ratios [1.1, 0.7, 1.5] per row.
    # seq0: r=1.1,A=1:    1.1 vs 1.1              -> l=-1.1, grad -1.1
    #       r=0.7,A=-1:  -0.7 vs 0.8*-1=-0.8      -> min -0.8, l=0.8, clipped low, grad 0
    #       r=1.5,A=0.5:  0.75 vs 1.2*0.5=0.6     -> min 0.6, l=-0.6, clipped high, grad 0
    # seq1: r=1.1,A=-2:  -2.2 vs -2.2             -> l=2.2, grad 2.2
    #       r=0.7,A=2:    1.4 vs 1.6              -> min 1.4, l=-1.4, grad -1.4
    #       r=1.5,A=0:    0                       -> l=0, grad 0
    # token norm: (-1.1+0.8-0.6+2.2-1.4+0)/6 = -0.1/6
    lp, old = _lp_from_ratios(RATIOS)
    adv = torch.tensor([[1.0, -1.0, 0.5], [-2.0, 2.0, 0.0]], dtype=torch.float64)
    loss, met = policy_loss(lp, old, adv, ONES, level="token", norm="token")
    _close(loss, -0.1 / 6)
    loss.backward()
    _close(lp.grad, [[-1.1 / 6, 0.0, 0.0], [2.2 / 6, -1.4 / 6, 0.0]])
    _close(met["policy/clip_low_frac"], 1 / 6)
    _close(met["policy/clip_high_frac"], 1 / 6)
    # [B] advantages give the same result as the same values broadcast to [B, T]
    adv_b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for level in LEVELS:
        for norm in NORMS:
            a, _ = policy_loss(lp, old, adv_b, ONES, level=level, norm=norm)
            b, _ = policy_loss(lp, old, adv_b[:, None].expand(2, 3), ONES, level=level, norm=norm)
            _close(a, b)


def test_clip_higher_asymmetric():
    # eps_low=0.2, eps_high=0.28 -> clip range [0.8, 1.28]; A = [+1, -1], r = [1.25, 0.75, 1.5]
    # seq0 A=+1: r=1.25 -> 1.25 vs 1.25 (inside) -> l=-1.25, grad -1.25
    #            r=0.75 -> 0.75 vs 0.8          -> l=-0.75, grad -0.75
    #            r=1.5  -> 1.5 vs 1.28          -> l=-1.28, grad 0 (with eps_high=0.2: -1.2)
    # seq1 A=-1: r=1.25 -> -1.25 vs -1.25       -> l=1.25, grad 1.25
    #            r=0.75 -> -0.75 vs -0.8        -> l=0.8, clipped low, grad 0
    #            r=1.5  -> -1.5 vs -1.28        -> l=1.5, grad 1.5
    # token norm: (-1.25-0.75-1.28) + (1.25+0.8+1.5) = -3.28 + 3.55 = 0.27; / 6 = 0.045
    lp, old = _lp_from_ratios([[1.25, 0.75, 1.5], [1.25, 0.75, 1.5]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, met = policy_loss(lp, old, adv, ONES, eps_low=0.2, eps_high=0.28, norm="token")
    _close(loss, 0.27 / 6)
    loss.backward()
    _close(lp.grad, [[-1.25 / 6, -0.75 / 6, 0.0], [1.25 / 6, 0.0, 1.5 / 6]])
    _close(met["policy/clip_high_frac"], 1 / 6)
    _close(met["policy/clip_low_frac"], 1 / 6)


# ---------------------------------------------------------------- sequence level (GSPO)


def test_sequence_level_values_and_gradient_spread():
    # mask [[1,1,1],[1,1,0]]; log-ratios seq0 [0.3,-0.1,0.1] -> mean 0.1 -> s0 = e^0.1
    # = 1.1051709; seq1 [-0.5,-0.3, 9.0 masked] -> mean -0.4 -> s1 = e^-0.4 = 0.6703200.
    # A = [+1, -1].
    # seq0: s0*A = 1.1051709, inside [0.8,1.2] -> l = -1.1051709 on each of 3 tokens.
    # seq1: s1*A = -0.6703200, clip(s1)=0.8 -> -0.8 -> min -0.8 -> l = 0.8, clipped low.
    # sequence norm: (-1.1051709 + 0.8)/2 = -0.15258545
    # token norm:    (3*-1.1051709 + 2*0.8)/5 = (-3.3155128+1.6)/5 = -0.34310256
    # grad (sequence norm): L0 = -A*s0 (token mean of a constant), ds0/dlp_t = s0/n0, so
    #   dL/dlp_t = -A*s0/(n0*B) = -1.1051709/6 = -0.18419515 on each seq0 token; seq1: 0.
    s0 = math.exp(0.1)
    lp, old = _lp_from_log_ratios([[0.3, -0.1, 0.1], [-0.5, -0.3, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, met = policy_loss(lp, old, adv, mask, level="sequence", norm="sequence")
    _close(loss, -0.15258545)
    loss.backward()
    _close(lp.grad, [[-s0 / 6] * 3, [0.0, 0.0, 0.0]])
    # ratio_mean over 5 masked tokens: (3*1.1051709 + 2*0.6703200)/5
    #   = (3.3155127 + 1.3406400)/5 = 4.6561527/5 = 0.93123054
    _close(met["policy/ratio_mean"], 0.93123054)
    _close(met["policy/clip_low_frac"], 2 / 5)
    _close(met["policy/clip_high_frac"], 0.0)
    lp.grad = None
    loss, _ = policy_loss(lp, old, adv, mask, level="sequence", norm="token")
    _close(loss, -0.34310256)
    # token norm: dL/dlp_t = sum_u(-A*s0/N)*(1/n0) = -A*s0/N = -1.1051709/5 per seq0 token
    loss.backward()
    _close(lp.grad, [[-s0 / 5] * 3, [0.0, 0.0, 0.0]])


def test_sequence_level_clip_high_positive_advantage():
    # seq0 log-ratios [0.5, 0.3, 0.4] -> mean 0.4 -> s = e^0.4 = 1.4918247 > 1.2, A=+1:
    #   min(1.4918247, 1.2) = 1.2 -> l = -1.2 per token, clipped high, grad 0.
    # seq1 log-ratios [0, 0, 0] -> s = 1, A=+2 -> l = -2 per token, grad -A*s/(n*B) = -2/6.
    # sequence norm: (-1.2 + -2)/2 = -1.6
    lp, old = _lp_from_log_ratios([[0.5, 0.3, 0.4], [0.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 2.0], dtype=torch.float64)
    loss, met = policy_loss(lp, old, adv, ONES, level="sequence", norm="sequence")
    _close(loss, -1.6)
    loss.backward()
    _close(lp.grad, [[0.0] * 3, [-2 / 6] * 3])
    _close(met["policy/clip_high_frac"], 3 / 6)


def test_sequence_token_same_value_different_gradient():
    # log-ratios seq0 [0.1, 0.0, -0.1] -> mean 0 -> s0 = 1; seq1 [0,0,0] -> s1 = 1.
    # A = [[1,2,3],[-1,0,1]] per token, all ratios 1 (inside the clip).
    # value: l_t = -A_t * 1 -> seq0 mean(-1,-2,-3) = -2, seq1 mean(1,0,-1) = 0 -> L = -1.0
    # sequence: every token moves s_i, ds_i/dlp_u = s_i/n_i:
    #   dL/dlp_u = (1/B)(1/n_i) sum_t(-A_t) * s_i/n_i = -(sum_t A_t)/(B n_i^2)
    #   seq0: -6/18 = -1/3 on each token; seq1: -0/18 = 0.
    # sequence_token: ds_it/dlp_u = s_i only for u = t:
    #   dL/dlp_t = -A_t * s_i/(B n_i) -> seq0 [-1/6, -2/6, -3/6], seq1 [1/6, 0, -1/6].
    adv = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    expected_grad = {
        "sequence": [[-1 / 3] * 3, [0.0] * 3],
        "sequence_token": [[-1 / 6, -2 / 6, -3 / 6], [1 / 6, 0.0, -1 / 6]],
    }
    for level, g in expected_grad.items():
        lp, old = _lp_from_log_ratios([[0.1, 0.0, -0.1], [0.0, 0.0, 0.0]])
        loss, met = policy_loss(lp, old, adv, ONES, level=level, norm="sequence")
        _close(loss, -1.0)
        _close(met["policy/ratio_mean"], 1.0)
        loss.backward()
        _close(lp.grad, g)


def test_sequence_token_matches_sequence_with_per_sequence_advantage():
    # With A_i per sequence GSPO-token's gradient equals GSPO's (Zheng et al. 2025); value
    # equal too, including a clipped sequence. Log-ratios not mean-zero, uneven mask.
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    out = {}
    for level in ("sequence", "sequence_token"):
        for norm in NORMS:
            lp, old = _lp_from_log_ratios([[0.3, -0.1, 0.1], [-0.5, 0.1, 2.0]])
            loss, met = policy_loss(lp, old, adv, mask, level=level, norm=norm)
            loss.backward()
            out[level, norm] = (loss.detach(), lp.grad.clone(), met)
    for norm in NORMS:
        _close(out["sequence", norm][0], out["sequence_token", norm][0])
        _close(out["sequence", norm][1], out["sequence_token", norm][1])
        assert out["sequence", norm][2] == pytest.approx(out["sequence_token", norm][2])
    # and differs from token level (sanity: the test can tell levels apart)
    lp, old = _lp_from_log_ratios([[0.3, -0.1, 0.1], [-0.5, 0.1, 2.0]])
    tok, _ = policy_loss(lp, old, adv, mask, level="token", norm="token")
    assert abs(tok.item() - out["sequence", "token"][0].item()) > 1e-3


# ---------------------------------------------------------------- KL (k3)


def test_kl_k3_on_and_off():
    # lp = old (ratio 1) and A = 0, so the policy term is 0 and only KL remains.
    # d = ref - lp = [[0, ln2, -ln2], [ln2, 0, 0]]
    # k3 = e^d - d - 1:  d=0 -> 0;  d=ln2 -> 2 - 0.6931472 - 1 = 0.3068528;
    #                    d=-ln2 -> 0.5 + 0.6931472 - 1 = 0.1931472
    # mean k3 over 6 tokens = (0.3068528*2 + 0.1931472)/6 = 0.8068528/6 = 0.13447547
    # loss (token norm, kl_coef 0.1) = 0.013447547
    # dk3/dlp = 1 - e^d: d=0 -> 0; ln2 -> -1; -ln2 -> 0.5 ; times 0.1/6
    ln2 = math.log(2.0)
    lp = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    ref = old + torch.tensor([[0.0, ln2, -ln2], [ln2, 0.0, 0.0]], dtype=torch.float64)
    adv = torch.zeros(2, dtype=torch.float64)
    loss, met = policy_loss(lp, old, adv, ONES, norm="token", ref_logprobs=ref, kl_coef=0.1)
    _close(loss, 0.013447547)
    _close(met["policy/kl"], 0.13447547)
    loss.backward()
    _close(lp.grad, [[0.0, -0.1 / 6, 0.05 / 6], [-0.1 / 6, 0.0, 0.0]])
    # kl_coef = 0: KL is logged but not in the loss
    loss, met = policy_loss(lp, old, adv, ONES, norm="token", ref_logprobs=ref, kl_coef=0.0)
    _close(loss, 0.0)
    _close(met["policy/kl"], 0.13447547)
    # no reference at all: kl metric 0.0
    _, met = policy_loss(lp, old, adv, ONES, norm="token")
    assert met["policy/kl"] == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, old, adv, ONES, kl_coef=0.1)


# ---------------------------------------------------------------- validation


def test_validation_errors():
    lp, old = _lp_from_ratios(RATIOS)
    adv = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sequence_token"):
        policy_loss(lp, old, adv, ONES, level="seq")
    with pytest.raises(ValueError, match="constant"):
        policy_loss(lp, old, adv, ONES, norm="mean")
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(lp, old[:, :2], adv, ONES)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(lp, old, adv, ONES[:1])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, torch.ones(3), ONES)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, old, adv, ONES, ref_logprobs=old[:, :1], kl_coef=0.1)
    assert LEVELS == ("token", "sequence", "sequence_token")
    assert NORMS == ("sequence", "token", "constant")


# ---------------------------------------------------------------- group advantages


def test_group_advantages_by_hand():
    # [3, 1, 2]: mean 2, population var ((1)^2+(-1)^2+0)/3 = 2/3, std 0.8164966
    # A = [1, -1, 0] / (0.8164966 + 1e-6) = [1.2247434, -1.2247434, 0] (to ~1.5e-6)
    s = torch.tensor([3.0, 1.0, 2.0])
    _close(group_advantages(s), [1.2247434, -1.2247434, 0.0], atol=1e-5)
    # eps=0 makes it exact: 1/sqrt(2/3) = sqrt(1.5) = 1.2247449
    _close(group_advantages(s, eps=0.0), [1.2247449, -1.2247449, 0.0], atol=1e-6)
    # Dr. GRPO: no std division -> [1, -1, 0]
    _close(group_advantages(s, std_norm=False), [1.0, -1.0, 0.0])
    # [1, 0, 0, 1]: mean 0.5, pop std 0.5 (unbiased would be 0.5774) -> +-0.5/0.5 = +-1
    _close(group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=0.0), [1, -1, -1, 1])
    # overrides (group split across batches): mean 1, std 2 -> (R - 1)/2
    _close(group_advantages(s, mean=1.0, std=2.0, eps=0.0), [1.0, 0.0, 0.5])
    _close(group_advantages(s, std_norm=False, mean=1.0), [2.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        group_advantages(s, mean=1.0)
    # all equal -> exact zeros (0.1*3/3 != 0.1 in floats, so this is not automatic)
    for v in (0.1, 0.3, 1.0):
        z = group_advantages(torch.full((5,), v))
        assert torch.equal(z, torch.zeros(5)), z
        assert torch.equal(group_advantages(torch.full((5,), v), std_norm=False), torch.zeros(5))
    assert torch.equal(group_advantages(s, mean=2.0, std=0.0), torch.zeros(3))
    # integer scores work; a batch of groups is normalised row by row
    _close(group_advantages(torch.tensor([2, 0]), std_norm=False), [1.0, -1.0])
    rows = group_advantages(torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 5.0]]), eps=0.0)
    _close(rows, [[1.2247449, -1.2247449, 0.0], [0.0, 0.0, 0.0]], atol=1e-6)
