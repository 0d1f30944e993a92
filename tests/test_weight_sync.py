"""lora_nccl's moving parts without vLLM: the adapter living in the send buckets (optimizer,
fp32 masters, peft save/load on those views), unpacking, the send order, lora_b's scale
and the standalone gloo group."""

from __future__ import annotations

import threading

import torch
from transformers import AutoModelForCausalLM

from example_trainer.config import TrainConfig
from example_trainer.model import wrap_lora
from example_trainer.optim import build_optimizer
from example_trainer.vllm.server import free_port
from example_trainer.vllm.lora_slot import scale_of, unpack
from example_trainer.vllm.worker_extension import (DTYPES, barrier, broadcast, exchange_max,
                                                   make_group)
from example_trainer.weight_sync import (AdapterBroadcaster, bucket_order, peft_name,
                                         resolve_backend)


def tiny_peft_model(model_dir) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = wrap_lora(model, TrainConfig(mode="lora_nccl", lora_rank=4))
    with torch.no_grad():  # lora_B starts at zero; make every tensor distinguishable
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def test_pack_then_unpack_gives_back_every_peft_tensor(tiny_model_dir):
    model = tiny_peft_model(tiny_model_dir)
    sender = AdapterBroadcaster(client=None, model=model, adapter_name="policy")
    sender.pack()
    tensors = unpack(sender.buckets, sender.specs)
    expected = {peft_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert tensors.keys() == expected.keys()
    assert all(".default." not in n and ".lora_" in n for n in tensors)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name]), name
    assert sender.peft_config["r"] == 4 and sorted(sender.peft_config["target_modules"])
    assert sender.backend == "gloo" == resolve_backend("auto", torch.device("cpu"))


def test_send_order_puts_the_scaled_halves_last_in_model_order():
    names = ["l0.q_proj.lora_A.weight", "l0.q_proj.lora_B.weight", "l0.v_proj.lora_A.weight",
             "l0.v_proj.lora_B.weight", "embed.lora_embedding_A", "embed.lora_embedding_B"]
    assert bucket_order(names) == [0, 2, 4, 1, 3, 5]


def test_scale_of_accepts_only_a_factor_that_reproduces_lora_b_exactly():
    raw = torch.tensor([[0.5, -1.25], [3.0, 0.0]])
    assert scale_of(raw * 2.0, raw) == 2.0  # read off the largest element: 6.0 / 3.0
    assert scale_of(raw * 2.0, raw, hint=2.0) == 2.0
    third = torch.tensor([[1.0, 2.0], [4.0, 8.0]]) * 3.0
    assert scale_of(third, third / 3.0, hint=3.0) == 3.0
    assert scale_of(torch.zeros(2, 2), torch.zeros(2, 2), hint=2.0) is None  # fresh lora_B
    uneven = raw.clone()
    uneven[0, 0] *= 3.0  # not one factor for the whole tensor
    assert scale_of(uneven * 2.0, raw) is None


def test_adapter_parameters_live_in_the_send_buckets(tiny_model_dir, tmp_path):
    model = tiny_peft_model(tiny_model_dir)
    optimizer = build_optimizer("adamw", model.parameters(), 1e-2)
    sender = AdapterBroadcaster(client=None, model=model, adapter_name="policy")
    [bucket] = sender.buckets
    # Every adapter parameter is a view into the one fp32 bucket, lora_A halves first.
    names = [n for n, _ in sender.params]
    halves = [".lora_B." in n for n in names]
    assert halves == sorted(halves) and any(halves) and not all(halves)
    offset = 0
    for _, p in sender.params:
        assert p.untyped_storage().data_ptr() == bucket.untyped_storage().data_ptr()
        assert p.storage_offset() == offset
        offset += p.numel()
    assert offset == bucket.numel()
    # The optimizer (built before the views, as TrainingRun does) updates the bucket.
    before = bucket.clone()
    loss = sum((p * p).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    assert not torch.equal(bucket, before)
    sender.pack()  # nothing to copy
    assert torch.equal(unpack([bucket], sender.specs)[names[0]], sender.params[0][1])
    # peft saves the views' values, and loading them back writes into the bucket.
    model.save_pretrained(tmp_path / "adapter")
    saved = bucket.clone()
    with torch.no_grad():
        bucket.zero_()
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    set_peft_model_state_dict(model, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert torch.equal(bucket, saved)
    # A parameter whose storage was replaced is copied back and aliased again.
    name, p = sender.params[3]
    p.data = p.data.clone() + 1
    expected = p.detach().clone()
    sender.pack()
    assert torch.equal(unpack([bucket], sender.specs)[name], expected)
    assert p.data_ptr() == bucket[sum(q.numel() for _, q in sender.params[:3]):].data_ptr()


def test_fp32_masters_write_into_bf16_buckets(tiny_model_dir):
    model = tiny_peft_model(tiny_model_dir).to(torch.bfloat16)
    optimizer = build_optimizer("adamw", model.parameters(), 1e-2)  # wraps in fp32 masters
    sender = AdapterBroadcaster(client=None, model=model, adapter_name="policy")
    [bucket] = sender.buckets
    assert bucket.dtype == torch.bfloat16
    params = [p for _, p in sender.params]
    (sum((p.float() ** 2).sum() for p in params)).backward()
    optimizer.step()
    masters = [optimizer.master(p) for p in params]
    assert all(m.dtype == torch.float32 for m in masters)
    assert torch.equal(bucket, torch.cat([m.to(torch.bfloat16).reshape(-1) for m in masters]))


def test_standalone_gloo_group_broadcasts_and_leaves_default_group_alone():
    port, prefix, received = free_port(), "test-run", {}

    def worker() -> None:
        group = make_group("127.0.0.1", port, prefix, 1, 2, "gloo", 30.0)
        buffer = torch.empty(6, dtype=DTYPES["float32"])
        broadcast(group, buffer, 30.0)
        barrier(group, torch.device("cpu"), 30.0)
        received["tensor"] = buffer

    thread = threading.Thread(target=worker)
    thread.start()
    group = make_group("127.0.0.1", port, prefix, 0, 2, "gloo", 30.0)
    broadcast(group, torch.arange(6, dtype=torch.float32), 30.0)
    barrier(group, torch.device("cpu"), 30.0)  # returns once the worker holds the tensor
    assert "tensor" in received or thread.is_alive()
    thread.join(60)
    assert torch.equal(received["tensor"], torch.arange(6, dtype=torch.float32))
    assert not torch.distributed.is_initialized()


def test_exchange_max_is_a_barrier_that_brings_back_each_figures_maximum():
    port, answers = free_port(), {}

    def worker() -> None:
        group = make_group("127.0.0.1", port, "test-max", 1, 2, "gloo", 30.0)
        answers["worker"] = exchange_max(group, [1.0, 0.25, 7.0], torch.device("cpu"), 30.0)

    thread = threading.Thread(target=worker)
    thread.start()
    group = make_group("127.0.0.1", port, "test-max", 0, 2, "gloo", 30.0)
    mine = exchange_max(group, [0.0, 0.5, 2.0], torch.device("cpu"), 30.0)
    thread.join(60)
    assert mine == answers["worker"] == [1.0, 0.5, 7.0]



def test_background_call_bounds_the_wait_and_names_the_call():
    """The HTTP half of a sync: its answer, its error (wrapped, naming the call) and a
    timeout while it still runs are told apart; a late answer is not taken for an error."""
    import time

    import pytest

    from example_trainer.weight_sync import BackgroundCall, WeightSyncError
    assert BackgroundCall(lambda: {"ok": 1}, "answer").join(5) == {"ok": 1}
    with pytest.raises(WeightSyncError, match="collective_rpc failed in vLLM: division by zero"):
        BackgroundCall(lambda: 1 / 0, "collective_rpc").join(5)
    release = threading.Event()
    slow = BackgroundCall(lambda: release.wait(10) and "late", "reset_prefix_cache")
    started = time.perf_counter()
    with pytest.raises(WeightSyncError, match="did not answer reset_prefix_cache within 0 s"):
        slow.join(0.05)
    assert time.perf_counter() - started < 5 and not slow.failed
    release.set()
    assert slow.join(5) == "late" and not slow.failed
    failing = BackgroundCall(lambda: 1 / 0, "x")
    failing.future.exception(5)  # let it end
    assert failing.failed
