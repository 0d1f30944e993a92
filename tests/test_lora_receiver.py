"""LoRAReceiver in a real vLLM (CPU): an adapter received in memory survives losing its slot
and LRU eviction.

One active slot, two CPU slots. A sync after the first copies straight into the active slot
and leaves the registered LoRA model's tensors behind; when another adapter takes the slot
and 'policy' comes back, vLLM re-activates it from those tensors, which must first be brought
up to date. A third adapter then evicts 'policy' from the CPU cache; vLLM reloads it through
the worker manager's `_load_adapter`, which must give back the weights received over the
group, not the (deleted, stale) directory it was first registered from.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import free_port, processes_listening_on
from example_trainer.config import TrainConfig
from example_trainer.model import wrap_lora
from example_trainer.parity import trainer_probe_logprobs
from example_trainer.vllm.server import VLLMServer
from example_trainer.weight_sync import EXTENSION, AdapterBroadcaster

pytestmark = pytest.mark.slow

PROMPT = [1, 17, 42, 99, 7, 3, 250, 11]


def served_gap(client, model: torch.nn.Module, name: str) -> float:
    """max |vLLM log-prob - trainer log-prob| over a short sampled answer under `name`."""
    [c] = client.completions(PROMPT, n=1, max_tokens=8, temperature=1.0, seed=7, model=name)
    mine = trainer_probe_logprobs(model, PROMPT + c.token_ids)[-len(c.logprobs):]
    return float((mine - torch.tensor(c.logprobs)).abs().max())


def registered(client) -> set[int]:
    """The adapter ids in the worker's CPU cache (vLLM's own `list_loras`)."""
    [ids] = client.collective_rpc("list_loras")  # a set: comes back as its str()
    return {int(i) for i in re.findall(r"\d+", str(ids))}


def test_received_adapter_survives_lru_eviction(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = wrap_lora(model, TrainConfig(mode="lora_nccl", lora_rank=8))
    model.eval()
    model.save_pretrained(tmp_path / "initial")  # lora_B = 0: the base model's outputs
    model.save_pretrained(tmp_path / "other")
    port = free_port()
    server = VLLMServer(tiny_model_dir, port=port, served_model_name="base", max_model_len=128,
                        enforce_eager=True, enable_lora=True, max_lora_rank=8,
                        worker_extension_cls=EXTENSION, dev_mode=True, kv_cache_gib=1,
                        logprobs_mode="processed_logprobs", seed=0,
                        log_path=tmp_path / "vllm.log",
                        extra_args=["--max-loras", "1", "--max-cpu-loras", "2"])
    server.start()
    sender = None

    def new_version(seed: int) -> dict[str, float]:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.2)
        return sender.sync()  # also resets the prefix cache

    try:
        client = server.client()
        sender = AdapterBroadcaster(client, model, "policy", timeout_s=60)
        sender.join()
        client.load_lora_adapter("policy", str(tmp_path / "initial"))
        [policy] = registered(client)
        shutil.rmtree(tmp_path / "initial")  # from here on only memory can serve 'policy'
        assert new_version(1)["sync/slot_copy"] == 0.0  # rebuilt; learns the slot plan
        assert served_gap(client, model, "policy") <= 1e-4
        assert new_version(2)["sync/slot_copy"] == 1.0  # straight into the active slot
        assert served_gap(client, model, "policy") <= 1e-4
        client.load_lora_adapter("other", str(tmp_path / "other"))
        client.completions(PROMPT, max_tokens=2, model="other")  # takes the one slot
        assert served_gap(client, model, "policy") <= 1e-4  # re-activated, up to date
        assert new_version(3)["sync/slot_copy"] == 1.0  # same model, same slot again
        assert served_gap(client, model, "policy") <= 1e-4
        client.load_lora_adapter("third", str(tmp_path / "other"))  # evicts 'other' (LRU)
        client.completions(PROMPT, max_tokens=2, model="other")  # evicts 'policy'
        assert policy not in registered(client)
        assert served_gap(client, model, "policy") <= 1e-4  # reloaded from memory
    finally:
        if sender is not None:
            sender.close()
        server.stop()
    assert processes_listening_on(port) == []
