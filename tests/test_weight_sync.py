"""lora_nccl's moving parts without vLLM: packing, unpacking and the standalone gloo group."""

from __future__ import annotations

import threading

import torch
from transformers import AutoModelForCausalLM

from example_trainer.config import TrainConfig
from example_trainer.model import wrap_lora
from example_trainer.vllm.server import free_port
from example_trainer.vllm.worker_extension import DTYPES, broadcast, make_group, unpack
from example_trainer.weight_sync import AdapterBroadcaster, peft_name, resolve_backend


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


def test_standalone_gloo_group_broadcasts_and_leaves_default_group_alone():
    port, prefix, received = free_port(), "test-run", {}

    def worker() -> None:
        group = make_group("127.0.0.1", port, prefix, 1, 2, "gloo", 30.0)
        buffer = torch.empty(6, dtype=DTYPES["float32"])
        broadcast(group, buffer, 30.0)
        received["tensor"] = buffer

    thread = threading.Thread(target=worker)
    thread.start()
    group = make_group("127.0.0.1", port, prefix, 0, 2, "gloo", 30.0)
    broadcast(group, torch.arange(6, dtype=torch.float32), 30.0)
    thread.join(60)
    assert torch.equal(received["tensor"], torch.arange(6, dtype=torch.float32))
    assert not torch.distributed.is_initialized()
