"""LoRAReceiver in a real vLLM (CPU): an adapter received in memory survives LRU eviction.

With one CPU adapter slot, serving a second adapter evicts 'policy'; vLLM then reloads it
through the worker manager's `_load_adapter`, which must give back the weights received over
the group, not the (deleted, stale) directory it was first registered from.
"""

from __future__ import annotations

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
                        extra_args=["--max-loras", "1", "--max-cpu-loras", "1"])
    server.start()
    sender = None
    try:
        client = server.client()
        sender = AdapterBroadcaster(client, model, "policy", timeout_s=60)
        sender.join()
        client.load_lora_adapter("policy", str(tmp_path / "initial"))
        shutil.rmtree(tmp_path / "initial")  # from here on only memory can serve 'policy'
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.2)
        sender.sync()
        client.reset_prefix_cache()
        assert served_gap(client, model, "policy") <= 1e-4
        client.load_lora_adapter("other", str(tmp_path / "other"))
        client.completions(PROMPT, max_tokens=2, model="other")  # evicts 'policy'
        assert served_gap(client, model, "policy") <= 1e-4  # reloaded from memory
    finally:
        if sender is not None:
            sender.close()
        server.stop()
    assert processes_listening_on(port) == []
