"""Sharded (DCP) checkpoints resume at another world size and continue exactly: one step,
save, resume, two more steps end where an uninterrupted 3-step run ends (parameters within
1e-5), with the same optimizer state, schedule and step at the resume point. Covered:
2 ranks -> 1 process, 1 process (DCP) -> 2 ranks, and today's single-process checkpoint
(save_pretrained + trainer_state.pt) -> 2 ranks. One spawn of 2 ranks does the 2-rank
halves; this process does the single-process ones."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distributed_worker import run_ranks
from example_trainer.checkpoint import Checkpointer, find_checkpoint
from example_trainer.config import TrainConfig
from example_trainer.optim import build_optimizer, build_scheduler
from example_trainer.step import StepConfig, grpo_step
from test_step import varied_batch

log = logging.getLogger(__name__)

pytestmark = pytest.mark.slow  # spawns 2 ranks

ATOL = 1e-5
STEPS = 3
CFG = TrainConfig(device="cpu", dtype="float32", lr=1e-3, micro_batch_size=2,
                  norm="token", warmup_steps=2, lr_schedule="linear", steps=STEPS)
STEP_CFG = StepConfig.from_config(CFG)


def build_model(path: Path | None = None) -> torch.nn.Module:
    if path is not None:  # weights from a single-process checkpoint, as load_model does
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


def batch_for(step: int):
    """A different batch each step (5 sequences: the ranks' parts are uneven)."""
    rows = [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [0, 2, 3, 4, 5]][step - 1]
    return varied_batch().rows(rows)


def train(model, optimizer, scheduler, steps, dist=None) -> None:
    from example_trainer.distributed import broadcast_batch, distributed_step
    for step in steps:
        if dist is None:
            grpo_step(model, optimizer, batch_for(step), STEP_CFG, scheduler)
        else:
            batch = broadcast_batch(dist, batch_for(step) if dist.is_main else None)
            distributed_step(model, optimizer, batch, dist, STEP_CFG, scheduler)


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def full_optim(model, optimizer) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq / step of every parameter, whole tensors, by name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True))["state"]
    return {f"{name}.{key}": torch.as_tensor(value).detach().clone()
            for name, entry in state.items() for key, value in entry.items()}


def fresh(dist=None, path: Path | None = None):
    from example_trainer.distributed import build_sharded_optimizer, shard_model
    model = build_model(path)
    if dist is not None:
        model = shard_model(model, CFG, dist)
        optimizer = build_sharded_optimizer(CFG, model)
    else:
        optimizer = build_optimizer(CFG.optimizer, model.parameters(), CFG.lr)
    return model, optimizer, build_scheduler(optimizer, CFG.warmup_steps, CFG.steps,
                                             CFG.lr_schedule)


def resume(dist, path: Path, weights: Path | None = None) -> dict:
    """Load a step-1 checkpoint, report the state at the resume point, train steps 2-3."""
    from example_trainer.distributed_checkpoint import load_checkpoint
    model, optimizer, scheduler = fresh(dist, weights)
    state = load_checkpoint(path, model, optimizer, scheduler)
    at_resume = {"step": state["step"], "last_epoch": scheduler.last_epoch,
                 "lr": optimizer.param_groups[0]["lr"], "params": full_params(model),
                 "optim": full_optim(model, optimizer)}
    train(model, optimizer, scheduler, range(state["step"] + 1, STEPS + 1), dist)
    return {"at_resume": at_resume, "final": full_params(model)}


def ranks_part(one_process_dcp: str, one_process_plain: str, two_rank_dir: str) -> dict:
    from example_trainer.distributed import init_distributed
    from example_trainer.distributed_checkpoint import ShardedCheckpointer
    dist = init_distributed(CFG)
    out = {"from_dcp": resume(dist, Path(one_process_dcp)),
           "from_plain": resume(dist, Path(one_process_plain), weights=Path(one_process_plain))}
    model, optimizer, scheduler = fresh(dist)
    train(model, optimizer, scheduler, [1], dist)
    ShardedCheckpointer(two_rank_dir, dist).save(1, model=model, optimizer=optimizer,
                                                 scheduler=scheduler)
    return out


def assert_close_dicts(got: dict, want: dict, what: str) -> float:
    assert got.keys() == want.keys(), what
    diff = max(float((got[k].double() - want[k].double()).abs().max()) for k in got)
    assert diff <= ATOL, f"{what}: differs by {diff}"
    return diff


def test_resume_across_world_sizes(tmp_path):
    from example_trainer.distributed_checkpoint import (ShardedCheckpointer,
                                                        is_sharded_checkpoint, load_checkpoint)
    # Uninterrupted reference, one process; and its state after step 1.
    model, optimizer, scheduler = fresh()
    train(model, optimizer, scheduler, [1])
    after_one = {"params": full_params(model), "optim": full_optim(model, optimizer),
                 "last_epoch": scheduler.last_epoch, "lr": optimizer.param_groups[0]["lr"]}
    ShardedCheckpointer(tmp_path / "one-dcp").save(1, model=model, optimizer=optimizer,
                                                   scheduler=scheduler)
    Checkpointer(tmp_path / "one-plain").save(1, model=model, optimizer=optimizer,
                                              scheduler=scheduler)
    train(model, optimizer, scheduler, [2, 3])
    expected = full_params(model)
    moved = max(float((expected[n] - after_one["params"][n]).abs().max()) for n in expected)
    assert moved > 1e-4  # steps 2-3 changed the parameters: the comparisons below can fail

    one_dcp = find_checkpoint(tmp_path / "one-dcp")
    assert is_sharded_checkpoint(one_dcp) and not is_sharded_checkpoint(
        find_checkpoint(tmp_path / "one-plain"))
    ranks = run_ranks(2, ranks_part, str(one_dcp), str(find_checkpoint(tmp_path / "one-plain")),
                      str(tmp_path / "two"), timeout=600)
    worst = 0.0
    for rank, result in enumerate(ranks):
        for source in ("from_dcp", "from_plain"):
            at = result[source]["at_resume"]
            what = f"rank {rank} {source}"
            assert at["step"] == 1 and at["last_epoch"] == after_one["last_epoch"], what
            assert at["lr"] == pytest.approx(after_one["lr"]), what
            worst = max(worst, assert_close_dicts(at["params"], after_one["params"], what),
                        assert_close_dicts(at["optim"], after_one["optim"], what),
                        assert_close_dicts(result[source]["final"], expected, what))

    # 2 ranks -> 1 process: no process group here.
    two = find_checkpoint(tmp_path / "two")
    assert is_sharded_checkpoint(two)
    assert sorted(p.name for p in (two / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                      "__1_0.distcp"]
    assert not list((tmp_path / "two").glob(".tmp-*"))  # renamed into place
    model, optimizer, scheduler = fresh()
    state = load_checkpoint(two, model, optimizer, scheduler)
    assert state["step"] == 1 and state["world_size"] == 2
    assert scheduler.last_epoch == after_one["last_epoch"]
    worst = max(worst,
                assert_close_dicts(full_params(model), after_one["params"], "2->1 params"),
                assert_close_dicts(full_optim(model, optimizer), after_one["optim"],
                                   "2->1 optimizer"))
    train(model, optimizer, scheduler, [2, 3])
    worst = max(worst, assert_close_dicts(full_params(model), expected, "2->1 final"))
    log.info("max difference, resumed across world sizes vs uninterrupted: %.3g", worst)
