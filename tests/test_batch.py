"""Scored groups -> tensors, checked position by position."""

from __future__ import annotations

import math

import pytest
import torch

from example_trainer.batch import (MalformedGroup, collate_groups, plan_by_tokens,
                                   validate_group)


def group(**overrides):
    g = {"tokens": [[5, 6, 7, 8], [5, 6, 9]],
         "masks": [[-100, -100, 7, 8], [-100, -100, 9]],
         "scores": [1.0, 0.0],
         "inference_logprobs": [[1.0, 1.0, -0.5, -0.25], [1.0, 1.0, -2.0]]}
    g.update(overrides)
    return g


def test_alignment_with_shifted_targets():
    batch = collate_groups([group()], pad_id=0)
    # tokens padded to T=4; per-target tensors have T-1=3 positions: targets tokens[1:].
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 6, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # target 6 (prompt) is not trained; 7, 8 are; second row: 6 no, 9 yes, pad no.
    assert batch.loss_mask.tolist() == [[0, 1, 1], [0, 1, 0]]
    # inference_logprobs[1:] on trained positions; NaN only on padding.
    assert batch.old_logprobs[0].tolist() == [1.0, -0.5, -0.25]
    assert batch.old_logprobs[1, :2].tolist() == [1.0, -2.0]
    assert math.isnan(batch.old_logprobs[1, 2])
    # scores [1, 0]: mean 0.5, population std 0.5 -> advantages +-1 (eps 1e-6),
    # broadcast over trained targets only.
    assert batch.advantages[0].tolist() == pytest.approx([0, 1, 1], abs=1e-5)
    assert batch.advantages[1].tolist() == pytest.approx([0, -1, 0], abs=1e-5)
    assert batch.temperatures.tolist() == [1.0, 1.0]
    assert batch.num_tokens == 3


def test_dr_grpo_skips_std_division():
    batch = collate_groups([group(scores=[3.0, 1.0])], pad_id=0, std_norm=False)
    # mean 2 -> advantages +1, -1 without dividing by the std (1.0 here, so use 3/1 -> +-1)
    assert batch.advantages[0, 1].item() == pytest.approx(1.0)
    batch = collate_groups([group(scores=[4.0, 0.0])], pad_id=0, std_norm=False)
    assert batch.advantages[0, 1].item() == pytest.approx(2.0)  # 4 - mean 2, std not used
    batch = collate_groups([group(scores=[4.0, 0.0])], pad_id=0, std_norm=True)
    assert batch.advantages[0, 1].item() == pytest.approx(1.0, abs=1e-5)  # 2 / std 2


def test_per_token_advantages_and_zero_override():
    batch = collate_groups([group(advantages=[[9, 9, 0.5, 0.25], [9, 9, -1.5]],
                                  overrides=[{}, {"set_advantage_to_zero": True}])], pad_id=0)
    assert batch.advantages[0].tolist() == [0.0, 0.5, 0.25]
    assert batch.advantages[1].tolist() == [0.0, 0.0, 0.0]


def test_temperature_precedence():
    g = group(overrides=[{"temperature": 0.3}, {}], generation_params={"temperature": 0.7},
              group_overrides={"temperature": 0.9})
    assert collate_groups([g], pad_id=0).temperatures.tolist() == pytest.approx([0.3, 0.7])
    g = group(group_overrides={"temperature": 0.9})
    assert collate_groups([g], pad_id=0).temperatures.tolist() == pytest.approx([0.9, 0.9])


def test_split_group_uses_whole_group_statistics():
    # A piece of a split group: its own scores [1, 1] would give zero advantage, but the
    # server says the whole group had mean 0.5 and std 0.5.
    g = group(scores=[1.0, 1.0], group_overrides={"group_score_mean": 0.5,
                                                  "group_score_std": 0.5, "split_of": 4})
    batch = collate_groups([g], pad_id=0)
    assert batch.advantages[0, 1].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("bad, field", [
    (dict(masks=[[-100, 7, 8], [-100, -100, 9]]), "masks[0]"),
    (dict(scores=[1.0]), "scores"),
    (dict(scores=[float("nan"), 0.0]), "scores[0]"),
    (dict(tokens=[[5, 6, 7, 8], [5, 6, 999]]), "tokens[1]"),
    (dict(inference_logprobs=[[1.0, 1.0], [1.0, 1.0, -2.0]]), "inference_logprobs[0]"),
    (dict(tokens=[]), "tokens"),
])
def test_malformed_groups_are_counted_not_fatal(bad, field):
    with pytest.raises(MalformedGroup, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate_group(group(**bad), vocab_size=100)
    rejected: list[str] = []
    batch = collate_groups([group(**bad), group()], pad_id=0, vocab_size=100,
                           rejected=rejected)
    assert len(rejected) == 1 and field.split("[")[0] in rejected[0]
    assert batch.size == 2  # the good group still trains


def test_micro_batches_trim_to_their_longest_sequence():
    g_long = group()
    g_short = {"tokens": [[1, 2], [1, 3]], "masks": [[-100, 2], [-100, 3]],
               "scores": [0.0, 1.0]}
    batch = collate_groups([g_long, g_short], pad_id=0)
    first, second = list(batch.micro_batches(2))
    assert first.input_ids.shape == (2, 4) and first.loss_mask.shape == (2, 3)
    assert second.input_ids.shape == (2, 2) and second.loss_mask.shape == (2, 1)
    assert torch.isnan(second.old_logprobs).all()  # no inference log-probs given


@pytest.mark.parametrize("lengths, budget, plan", [
    # longest first, ties in batch order: 8(1) 8(2) | 7(4) 7(5) | 5(0) 3(3)
    ([5, 8, 8, 3, 7, 7], 16, [[1, 2], [4, 5], [0, 3]]),
    # 3 x 8 = 24 fits; the fourth would pad to 4 x 8 = 32; then 7, 5, 3 pad to 3 x 7 = 21
    ([5, 8, 8, 3, 7, 7], 24, [[1, 2, 4], [0, 3, 5]]),
    ([5, 8, 8, 3, 7, 7], 48, [[0, 1, 2, 3, 4, 5]]),
    # a sequence over the budget trains alone; the rest still pack
    ([9, 2, 2, 2], 4, [[0], [1, 2], [3]]),
    ([4], 1, [[0]]),
    ([], 8, []),
])
def test_token_budget_plan(lengths, budget, plan):
    assert plan_by_tokens(lengths, budget) == plan


def test_token_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens"):
        plan_by_tokens([3, 4], 0)


def test_token_micro_batches_keep_rows_and_trim_to_their_longest():
    g_long = group()  # lengths 4, 3
    g_short = {"tokens": [[1, 2], [1, 3, 4]], "masks": [[-100, 2], [-100, 3, 4]],
               "scores": [0.0, 1.0]}
    batch = collate_groups([g_long, g_short], pad_id=0)  # lengths [4, 3, 2, 3]
    assert batch.lengths == [4, 3, 2, 3]
    parts = list(batch.token_micro_batches(6))  # [0] (4+4 > 6), [1, 3] (6), [2]
    assert [p.input_ids.shape for p in parts] == [(1, 4), (2, 3), (1, 2)]
    assert [p.loss_mask.shape for p in parts] == [(1, 3), (2, 2), (1, 1)]
    assert parts[1].input_ids.tolist() == [[5, 6, 9], [1, 3, 4]]
    assert parts[1].loss_mask.tolist() == [[0, 1], [1, 1]]  # target 6 is prompt
    assert parts[1].scores.tolist() == [0.0, 1.0]
    assert parts[2].input_ids.tolist() == [[1, 2]]
    assert torch.equal(parts[0].advantages, batch.advantages[:1])
    assert sum(p.num_tokens for p in parts) == batch.num_tokens
