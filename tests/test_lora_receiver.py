"""LoRAReceiver in a real vLLM (CPU): an adapter received in memory survives losing its slot
and LRU eviction, whichever way a sync arrives.

One active slot, two CPU slots. The first sync over a group is an rpc that rebuilds the
adapter through vLLM's own path and learns the slot plan; later syncs are streamed (no rpc)
and installed at vLLM's next engine step, straight into the active slot. When another adapter
holds the slot, a sync waits for the adapter's next activation; when a third adapter evicted
it, vLLM reloads it through the worker manager's `_load_adapter`, which must give back the
weights received over the group, not the (deleted, stale) directory it was first registered
from; the sync after that rebuilds. The listener also takes the bare-broadcast benchmark's
rounds; joining a new group stops it, and that group's first sync is an rpc again.
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

# Longer than one KV block (--block-size 32 below; vLLM-CPU's default is 128), so vLLM's
# prefix cache keeps the prompt's first block between probes: a swap that forgot the reset
# would be served with KV computed by the previous adapter (checked at the end).
PROMPT = [1, 17, 42, 99, 7, 3, 250, 11] * 5


def served_gap(client, model: torch.nn.Module, name: str) -> float:
    """max |vLLM log-prob - trainer log-prob| over a short sampled answer under `name`."""
    [c] = client.completions(PROMPT, n=1, max_tokens=8, temperature=1.0, seed=7, model=name)
    mine = trainer_probe_logprobs(model, PROMPT + c.token_ids)[-len(c.logprobs):]
    return float((mine - torch.tensor(c.logprobs)).abs().max())


def registered(client) -> set[int]:
    """The adapter ids in the worker's CPU cache (vLLM's own `list_loras`)."""
    [ids] = client.collective_rpc("list_loras")  # a set: comes back as its str()
    return {int(i) for i in re.findall(r"\d+", str(ids))}


def installed_by(sender) -> str:
    """How the worker installed the newest streamed sync (nothing may still be pending)."""
    [last] = sender.last_installs()
    assert not last["pending"] and not last["error"], last
    return last["path"]


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
                        extra_args=["--max-loras", "1", "--max-cpu-loras", "2",
                                    "--block-size", "32"])
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
        first = new_version(1)  # an rpc: rebuilt; learns the slot plan
        assert (first["sync/streamed"], first["sync/slot_copy"]) == (0.0, 0.0)
        assert served_gap(client, model, "policy") <= 1e-4
        second = new_version(2)
        assert second["sync/streamed"] == 1.0
        assert second["sync/slot_copy"] == 0.0  # a streamed sync reports the install before
        assert served_gap(client, model, "policy") <= 1e-4  # installed at this engine step
        assert installed_by(sender) == "slot copy"  # straight into the active slot
        client.load_lora_adapter("other", str(tmp_path / "other"))
        client.completions(PROMPT, max_tokens=2, model="other")  # takes the one slot
        assert served_gap(client, model, "policy") <= 1e-4  # re-activated, up to date
        assert new_version(3)["sync/slot_copy"] == 1.0  # sync 2's install
        assert served_gap(client, model, "policy") <= 1e-4
        assert installed_by(sender) == "slot copy"  # same model, same slot again
        client.completions(PROMPT, max_tokens=2, model="other")  # takes the slot again
        new_version(4)
        assert served_gap(client, model, "policy") <= 1e-4
        assert installed_by(sender) == "at activation"  # parked, refreshed when it came back
        client.load_lora_adapter("third", str(tmp_path / "other"))  # evicts 'other' (LRU)
        client.completions(PROMPT, max_tokens=2, model="other")  # evicts 'policy'
        assert policy not in registered(client)
        new_version(5)
        assert served_gap(client, model, "policy") <= 1e-4  # reloaded from memory
        assert installed_by(sender) == "at reload"
        new_version(6)
        assert served_gap(client, model, "policy") <= 1e-4
        assert installed_by(sender) == "rebuild"  # a reloaded model: learn its slot again
        new_version(7)
        assert served_gap(client, model, "policy") <= 1e-4
        assert installed_by(sender) == "slot copy"
        assert len(sender.time_bare_broadcast(rounds=2)) == 2  # the listener drops them
        assert new_version(8)["sync/streamed"] == 1.0
        assert served_gap(client, model, "policy") <= 1e-4
        sender.join()  # a new group: the old listener stops, the next sync is an rpc
        assert new_version(8)["sync/streamed"] == 0.0
        assert served_gap(client, model, "policy") <= 1e-4
        assert new_version(9)["sync/streamed"] == 1.0
        assert served_gap(client, model, "policy") <= 1e-4
        # The reset is what keeps those parity checks honest: the probe above cached the
        # prompt's first block; a swap without the reset serves that stale KV.
        torch.manual_seed(10)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(std=0.2)
        sender.sync(reset_prefix_cache=False)
        assert served_gap(client, model, "policy") > 1e-3
        sender.sync()  # the same weights again, and the reset
        assert served_gap(client, model, "policy") <= 1e-4
    finally:
        if sender is not None:
            sender.close()
        server.stop()
    assert processes_listening_on(port) == []
