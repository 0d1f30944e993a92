"""Data-parallel pieces that need no process group: what is refused at start-up, how a batch
is split between ranks, and that the ranks' micro-batch weights add up to the whole batch's
(the multi-rank equality itself: tests/test_distributed_step.py)."""

from __future__ import annotations

import pytest
import torch

from example_trainer.config import ConfigError, TrainConfig
from example_trainer.distributed import (SHARDED_OPTIMIZERS, batch_share,
                                         check_distributed_support, init_distributed,
                                         rank_rows, world_size_from_env)
from example_trainer.step import StepConfig, _micro_weight, split_batch
from test_step import varied_batch


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size_from_env() == 1 and init_distributed(TrainConfig()) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed(TrainConfig(mode="shared_vllm", optimizer="adamw_8bit")) is None


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adafactor"])
def test_optimizers_that_cannot_shard_are_refused_in_one_line(optimizer):
    with pytest.raises(ConfigError, match=f"--optimizer {optimizer} cannot run sharded") as err:
        check_distributed_support(TrainConfig(optimizer=optimizer), 2)
    assert "\n" not in str(err.value) and "adamw or adamw_cpu" in str(err.value)
    check_distributed_support(TrainConfig(optimizer=optimizer), 1)  # one process: fine


def test_a_one_rank_group_refuses_an_optimizer_that_cannot_shard(monkeypatch):
    """`even_alone` (the benchmark's and GPU tests' one-rank FSDP2 group) shards too, so it
    refuses what cannot run sharded before any process group exists."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="--optimizer adafactor cannot run on FSDP2"):
        init_distributed(TrainConfig(optimizer="adafactor", device="cpu"), even_alone=True)
    assert init_distributed(TrainConfig(optimizer="adafactor")) is None  # a plain process


@pytest.mark.parametrize("optimizer", SHARDED_OPTIMIZERS)
def test_sharded_optimizers_pass(optimizer):
    check_distributed_support(TrainConfig(optimizer=optimizer, mode="legacy"), 4)


def test_shared_vllm_is_refused_with_the_reason_and_the_alternative(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as err:
        init_distributed(TrainConfig(mode="shared_vllm"))  # refused before any group starts
    message = str(err.value)
    assert "\n" not in message and "one copy of the weights" in message
    assert "full_nccl" in message


@pytest.mark.parametrize("size, world, expected", [
    (6, 2, [[0, 1, 2], [3, 4, 5]]),
    (5, 2, [[0, 1, 2], [3, 4]]),
    (1, 2, [[0], []]),
    (7, 3, [[0, 1, 2], [3, 4], [5, 6]]),
])
def test_rank_rows_cover_the_batch_once(size, world, expected):
    assert [rank_rows(size, world, r) for r in range(world)] == expected


@pytest.mark.parametrize("norm", ["sequence", "token", "constant"])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [1]])
def test_rank_weights_are_shares_of_the_whole_batch(norm, rows):
    """Every rank's micro-batch weights are relative to the whole batch: sequence and token
    weights add up to 1 over the ranks; a constant weight turns each micro-batch's own
    1/(b*t) into the whole batch's 1/(B*T), with T the global padded length."""
    batch = varied_batch().rows(rows)
    step_cfg = StepConfig(micro_batch_size=2, norm=norm)
    total, passes = 0.0, []
    for rank in range(2):
        part, share = batch_share(batch, rank, 2, step_cfg)
        assert share.sequences == batch.size and share.tokens == batch.num_tokens
        assert share.padded_len == batch.loss_mask.shape[1]  # the global padded length
        mbs = list(split_batch(part, step_cfg)) if part is not None else []
        passes.append((len(mbs), share.passes))
        for mb in mbs:
            weight = _micro_weight(norm, mb, share)
            total += weight
            if norm == "constant":
                assert weight / (mb.size * mb.loss_mask.shape[1]) == pytest.approx(
                    1 / (batch.size * batch.loss_mask.shape[1]))
    if norm != "constant":
        assert total == pytest.approx(1.0)
    assert len({p for _, p in passes}) == 1 and passes[0][1] == max(n for n, _ in passes)


def test_uneven_split_gives_ranks_different_padded_lengths():
    batch = varied_batch()  # lengths [5, 8, 8, 3, 7, 7]
    step_cfg = StepConfig(micro_batch_size=2)
    parts = [batch_share(batch, rank, 2, step_cfg)[0] for rank in range(2)]
    assert [p.input_ids.shape[1] for p in parts] == [8, 7]
    part, share = batch_share(batch.rows([1]), 1, 2, step_cfg)
    assert part is None and share.passes == 1 and share.filler.size == 1


def test_a_single_process_step_reports_what_it_always_did():
    """The share argument is optional: without it, figures are the batch's own."""
    from example_trainer.step import accumulate_gradients
    from test_step import tiny_llama
    metrics = accumulate_gradients(tiny_llama(), varied_batch(), StepConfig(micro_batch_size=4))
    assert metrics["train/sequences"] == 6 and metrics["train/tokens"] == 20
    assert metrics["train/micro_batches"] == 2
    assert metrics["train/reward_mean"] == pytest.approx(float(varied_batch().scores.mean()))
    assert torch.isfinite(torch.tensor(metrics["policy/loss"]))
