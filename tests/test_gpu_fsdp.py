"""FSDP2 on CUDA with NCCL: the GPU half of the scale-out tests (the CPU half, on gloo, is
test_distributed_step). One rank per GPU, so a one-GPU machine runs a one-rank NCCL group:
every FSDP2 path of the trainer (sharding, the bf16 mixed-precision policy with fp32
shards, CPU offload with pinned memory, the collectives, the gathers a sync uses) on the
device, against one plain process on the same GPU. With two GPUs, two ranks.

The targets take the device as an argument, so the same code runs on CPU/gloo by hand:
`run_ranks(1, sharded_steps, "cpu", "float32", "adamw")`."""

from __future__ import annotations

import logging

import pytest
import torch

from distributed_worker import run_ranks
from example_trainer.config import TrainConfig
from example_trainer.optim import build_optimizer
from example_trainer.step import StepConfig, grpo_step
from test_distributed_step import build_model
from test_step import varied_batch

log = logging.getLogger(__name__)

needs_cuda = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def on_cuda(test):
    for mark in needs_cuda:
        test = mark(test)
    return test

STEPS = 2


def world() -> int:
    return max(1, min(2, torch.cuda.device_count()))


def configs(device: str, dtype: str, optimizer: str) -> tuple[TrainConfig, StepConfig]:
    cfg = TrainConfig(device=device, dtype=dtype, optimizer=optimizer, norm="token", lr=1e-4,
                      micro_batch_size=2, max_grad_norm=1.0)
    return cfg, StepConfig.from_config(cfg)


PROBE = [3, 17, 5, 42, 8, 11, 60, 2]


def one_process(device: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The reference: fp32 AdamW on the device, no process group; parameters and the
    parity probe's log-probs after the steps."""
    from example_trainer.parity import trainer_probe_logprobs
    cfg, step_cfg = configs(device, "float32", "adamw")
    model = build_model("llama").to(device)
    optimizer = build_optimizer("adamw", model.parameters(), cfg.lr)
    for _ in range(STEPS):
        grpo_step(model, optimizer, varied_batch(), step_cfg)
    return ({n: p.detach().cpu().clone() for n, p in model.named_parameters()},
            trainer_probe_logprobs(model, PROBE))


def sharded_steps(device: str, dtype: str, optimizer_name: str) -> dict:
    """On each rank: shard, train STEPS steps, gather the full state dict to rank 0."""
    from example_trainer.distributed import (broadcast_batch, build_sharded_optimizer,
                                             distributed_step, gather_full_state_dict,
                                             init_distributed, shard_model)
    from example_trainer.parity import trainer_probe_logprobs
    cfg, step_cfg = configs(device, dtype, optimizer_name)
    dist = init_distributed(cfg, even_alone=True)
    assert dist is not None and dist.backend == ("nccl" if device == "cuda" else "gloo")
    model = shard_model(build_model("llama").to(dist.device), cfg, dist)
    optimizer = build_sharded_optimizer(cfg, model)
    # bf16 compute keeps fp32 shards (FSDP2's MixedPrecisionPolicy): no masters wrapper.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    placement = {p.to_local().device.type for p in model.parameters()}
    for _ in range(STEPS):
        batch = broadcast_batch(dist, varied_batch() if dist.is_main else None)
        distributed_step(model, optimizer, batch, dist, step_cfg)
    probe = trainer_probe_logprobs(model, PROBE)  # a collective forward, on the rank device
    full = gather_full_state_dict(model)
    return {"params": {n: t.clone() for n, t in full.items()}, "placement": placement,
            "probe": probe,
            "peak_mib": (torch.cuda.max_memory_allocated(dist.device) / 2**20
                         if device == "cuda" else 0.0)}


def sharded_adapter(device: str, optimizer: str = "adamw") -> dict:
    """On each rank: a sharded LoRA model's adapter, gathered the two ways a sync does
    (lora_hotswap's trainable-only state dict; lora_nccl's send buckets, on the device for
    NCCL), against the full tensors. adamw_cpu: from shards in CPU memory."""
    from example_trainer.distributed import (gather_full_state_dict, init_distributed,
                                             shard_model)
    from example_trainer.weight_sync import AdapterBroadcaster
    from example_trainer.weight_sync import peft_name
    cfg, _ = configs(device, "float32", optimizer)
    dist = init_distributed(cfg, even_alone=True)
    assert dist is not None
    model = build_model("lora")  # the adapter before sharding: what the gathers must give
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model = shard_model(model.to(dist.device), cfg, dist)
    broadcaster = AdapterBroadcaster(None, model, "adapter", backend="nccl" if device == "cuda"
                                     else "gloo")  # type: ignore[arg-type]  # no vLLM here
    assert broadcaster.sharded and broadcaster.sends == dist.is_main
    by_peft_name = {peft_name(n): t for n, t in before.items()}
    expected = torch.cat([by_peft_name[name].reshape(-1) for name, _ in broadcaster.params])
    adapter = gather_full_state_dict(model, trainable_only=True)
    return {"bucket_device": broadcaster.buckets[0].device.type,
            "bucket_equal": bool(torch.equal(broadcaster.buckets[0].cpu(), expected)),
            "adapter_keys": sorted(adapter),
            "adapter_equal": bool(adapter) and all(torch.equal(adapter[n], before[n])
                                                   for n in adapter),
            "expected_keys": sorted(before)}


@on_cuda
@pytest.mark.parametrize("dtype,optimizer", [("float32", "adamw"), ("float32", "adamw_cpu"),
                                             ("bfloat16", "adamw")])
def test_fsdp2_on_cuda_equals_one_process(dtype, optimizer):
    ranks = run_ranks(world(), sharded_steps, "cuda", dtype, optimizer, timeout=300)
    result = ranks[0]
    expected, expected_probe = one_process("cuda")
    initial = {n: p.detach() for n, p in build_model("llama").named_parameters()}
    # The state dict also names the tied lm_head, which named_parameters() does not.
    assert expected.keys() <= result["params"].keys()
    params = {n: result["params"][n] for n in expected}
    assert all(t.device.type == "cpu" for t in params.values())  # gathered with CPU offload
    # adamw_cpu: the shards live in CPU memory (FSDP2's CPUOffloadPolicy), else on the GPU.
    assert result["placement"] == {"cpu" if optimizer == "adamw_cpu" else "cuda"}
    moved = sum(float((expected[n] - initial[n]).abs().sum()) for n in params)
    off = sum(float((params[n] - expected[n]).abs().sum()) for n in params)
    worst = max(float((params[n] - expected[n]).abs().max()) for n in params)
    print(f"gpu-figure: FSDP2 {world()} rank(s) NCCL {dtype} {optimizer} vs one process "
          f"fp32: max |diff| {worst:.3g}, displacement off by {off / moved:.3g}, peak "
          f"{result['peak_mib']:.1f} MiB")
    assert max(float((expected[n] - initial[n]).abs().max()) for n in params) > 1e-4
    if dtype == "float32":
        assert worst <= 1e-5, worst
        assert torch.allclose(result["probe"], expected_probe, atol=1e-4)
    else:  # bf16 compute: the fp32 update, roughly
        assert off / moved < 0.1, off / moved


@on_cuda
@pytest.mark.parametrize("optimizer", ["adamw", "adamw_cpu"])
def test_fsdp2_adapter_gathers_on_cuda(optimizer):
    [result, *_] = run_ranks(world(), sharded_adapter, "cuda", optimizer, timeout=300)
    assert result["bucket_device"] == "cuda"  # NCCL sends from device buckets
    check_adapter(result)


@pytest.mark.slow
def test_fsdp2_adapter_gathers_on_cpu():
    """Two gloo ranks: rank 0 holds exactly the adapter (no tied lm_head: it is frozen, and
    as large as the vocabulary), the other rank nothing; the send buckets on every rank."""
    rank0, rank1 = run_ranks(2, sharded_adapter, "cpu", timeout=300)
    assert rank0["bucket_device"] == rank1["bucket_device"] == "cpu"
    check_adapter(rank0)
    assert rank1["bucket_equal"] and rank1["adapter_keys"] == []


def check_adapter(result: dict) -> None:
    """The buckets and rank 0's adapter hold the LoRA tensors as they were before sharding
    (nothing trained since), under their unsharded names, and nothing else."""
    assert result["bucket_equal"]
    assert result["adapter_keys"] == result["expected_keys"]
    assert all("lora_" in k for k in result["adapter_keys"]) and result["adapter_equal"]
