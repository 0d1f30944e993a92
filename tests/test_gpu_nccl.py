"""lora_nccl's CUDA half without vLLM: the adapter packed into flat CUDA buckets, unpacked
exactly, and broadcast over a standalone NCCL group built by the project's `make_group`.

Run with `-m gpu`; skipped without CUDA (the two-rank broadcast also needs two GPUs). The
pack time of a SmolLM2-135M-sized r=8 adapter is printed as a `gpu-figure:` line and
recorded as a junit property, never asserted.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid

import pytest
import torch

from example_trainer.config import TrainConfig
from example_trainer.model import wrap_lora
from example_trainer.vllm.server import free_port
from example_trainer.vllm.lora_slot import unpack
from example_trainer.vllm.worker_extension import broadcast, make_group
from example_trainer.weight_sync import AdapterBroadcaster, peft_name

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TIMEOUT_S = 60.0


def cuda_adapter(model_dir, rank: int = 4) -> torch.nn.Module:
    """The tiny model with a LoRA adapter on CUDA, every adapter tensor distinguishable
    (lora_B starts at zero) and the `up_proj` adapters in bf16, so two buckets are packed."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = wrap_lora(model, TrainConfig(mode="lora_nccl", lora_rank=rank)).to("cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_()
                if "up_proj" in name:
                    p.data = p.data.to(torch.bfloat16)
    return model


def shutdown(group) -> None:
    if hasattr(group, "shutdown"):
        group.shutdown()


def test_pack_on_cuda_then_unpack_is_exact(tiny_model_dir):
    model = cuda_adapter(tiny_model_dir)
    sender = AdapterBroadcaster(client=None, model=model, adapter_name="policy",
                                backend="nccl")
    sender.pack()
    assert [b.dtype for b in sender.buckets] == [torch.float32, torch.bfloat16]
    assert all(b.is_cuda for b in sender.buckets)
    tensors = unpack(sender.buckets, sender.specs)
    expected = {peft_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert tensors.keys() == expected.keys()
    for name, tensor in tensors.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    assert sender.nbytes == sum(p.numel() * p.element_size() for p in expected.values())


def test_one_rank_nccl_group_broadcasts_the_packed_buckets(tiny_model_dir):
    sender = AdapterBroadcaster(client=None, model=cuda_adapter(tiny_model_dir),
                                adapter_name="policy", backend="nccl")
    sender.pack()
    sent = [b.clone() for b in sender.buckets]
    group = make_group("127.0.0.1", free_port(), f"gpu-test-{uuid.uuid4().hex}", 0, 1, "nccl",
                       TIMEOUT_S)
    try:
        for bucket in sender.buckets:
            broadcast(group, bucket, TIMEOUT_S)
        torch.cuda.synchronize()
    finally:
        shutdown(group)
    assert all(torch.equal(a, b) for a, b in zip(sender.buckets, sent))
    assert not torch.distributed.is_initialized()  # the default group is never touched


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a two-rank NCCL group needs 2 GPUs")
def test_two_rank_nccl_broadcast_reaches_the_other_gpu(tiny_model_dir):
    sender = AdapterBroadcaster(client=None, model=cuda_adapter(tiny_model_dir),
                                adapter_name="policy", backend="nccl")
    sender.pack()
    port, prefix, received = free_port(), f"gpu-test-{uuid.uuid4().hex}", {}

    def receiver() -> None:  # what LoRAReceiver.receive_adapter does, on cuda:1
        torch.cuda.set_device(1)
        group = make_group("127.0.0.1", port, prefix, 1, 2, "nccl", TIMEOUT_S)
        buckets = [torch.empty(b.numel(), dtype=b.dtype, device="cuda:1")
                   for b in sender.buckets]
        for bucket in buckets:
            broadcast(group, bucket, TIMEOUT_S)
        torch.cuda.synchronize(1)
        received["tensors"] = unpack([b.cpu() for b in buckets], sender.specs)
        shutdown(group)

    thread = threading.Thread(target=receiver)
    thread.start()
    group = make_group("127.0.0.1", port, prefix, 0, 2, "nccl", TIMEOUT_S)
    for bucket in sender.buckets:
        broadcast(group, bucket, TIMEOUT_S)
    thread.join(TIMEOUT_S * 2)
    shutdown(group)
    expected = unpack([b.cpu() for b in sender.buckets], sender.specs)
    assert received["tensors"].keys() == expected.keys()
    assert all(torch.equal(received["tensors"][n], t) for n, t in expected.items())


def test_pack_time_of_a_smollm2_sized_adapter(record_property):
    """SmolLM2-135M's shapes (30 layers, hidden 576, GQA 9/3 heads of 64, MLP 1536) with the
    default r=8 adapter on all seven projections: 2.44M fp32 values, about 9.8 MB."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, tie_word_embeddings=True)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model = wrap_lora(model, TrainConfig(mode="lora_nccl", lora_rank=8))
    sender = AdapterBroadcaster(client=None, model=model, adapter_name="policy",
                                backend="nccl")
    assert 9.0e6 < sender.nbytes < 10.5e6 and sender.buckets[0].is_cuda
    for _ in range(3):  # warm-up
        sender.pack()
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sender.pack()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median_ms = statistics.median(times) * 1e3
    record_property("lora_pack_ms_smollm2_r8", round(median_ms, 4))
    record_property("lora_pack_bytes_smollm2_r8", sender.nbytes)
    print(f"gpu-figure: lora_nccl pack, SmolLM2-135M-sized r=8 adapter "
          f"({sender.nbytes / 1e6:.2f} MB, {len(sender.params)} tensors, "
          f"{torch.cuda.get_device_name()}): median {median_ms:.3f} ms over 20 packs "
          f"(min {min(times) * 1e3:.3f} ms)")
