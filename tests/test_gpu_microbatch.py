"""The micro-batch token budget: the CPU fallback here, the CUDA probe under @gpu."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from example_trainer.batch import collate_groups
from example_trainer.config import TrainConfig
from example_trainer.microbatch import (pending_optimizer_state_bytes, probe_micro_batch_tokens,
                                        resolve_micro_batch_tokens)
from example_trainer.offload_adamw import CPUOffloadAdamW
from example_trainer.step import StepConfig, grpo_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_llama(device: str, vocab: int = 64, hidden: int = 32, layers: int = 1
                ) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(device)


# --- CPU: auto never probes -----------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(-1, 0), (0, 0), (2048, 2048)])
def test_resolve_on_cpu_never_probes(value, expected):
    cfg = TrainConfig(micro_batch_tokens=value)
    assert resolve_micro_batch_tokens(cfg, small_llama("cpu")) == expected


def test_probe_on_cpu_returns_off():
    assert probe_micro_batch_tokens(small_llama("cpu"), 64) == 0


def test_pending_optimizer_state_is_two_moments_until_the_first_step():
    model = small_llama("cpu")
    elements = sum(p.numel() for p in model.parameters())
    cpu = torch.device("cpu")
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert pending_optimizer_state_bytes(adamw, cpu) == 2 * 4 * elements  # fp32 moments
    assert pending_optimizer_state_bytes(CPUOffloadAdamW(model.parameters(), lr=1e-3),
                                         cpu) == 0
    assert pending_optimizer_state_bytes(None, cpu) == 0
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    adamw.step()
    assert pending_optimizer_state_bytes(adamw, cpu) == 0  # allocated: nothing pending


# --- CUDA -------------------------------------------------------------------------------


def long_batch(sequences: int, seq_len: int, vocab: int):
    gen = torch.Generator().manual_seed(1)
    groups = []
    for g in range(sequences // 2):
        tokens = torch.randint(0, vocab, (2, seq_len), generator=gen).tolist()
        masks = [[-100] * 8 + row[8:] for row in tokens]
        groups.append({"tokens": tokens, "masks": masks, "scores": [0.0, 1.0]})
    return collate_groups(groups, pad_id=0)


@pytest.mark.gpu
@cuda
def test_probe_backs_off_and_a_step_at_its_budget_runs():
    device = torch.device("cuda")
    model = small_llama("cuda", vocab=32000, hidden=256, layers=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq_len, cap = 512, 256 * 512
    # Leave ~3 GiB free so the doubling runs out of memory well below the cap.
    free, _ = torch.cuda.mem_get_info(device)
    ballast = torch.empty(free - 3 * (1 << 30), dtype=torch.uint8, device=device)
    allocated = torch.cuda.memory_allocated(device)
    rng_cpu, rng_cuda = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    budget = probe_micro_batch_tokens(model, seq_len, optimizer=optimizer, max_tokens=cap,
                                      chunk_size=1024)
    assert seq_len // 2 <= budget < cap  # an OOM bounded it, one sequence fitted
    # Trials freed (they took GiBs); only library workspaces may stay (cuBLAS: 64 MiB seen).
    assert torch.cuda.memory_allocated(device) - allocated <= 256 << 20
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng_cpu, torch.get_rng_state())
    assert torch.equal(rng_cuda, torch.cuda.get_rng_state(device))

    batch = long_batch(32, seq_len, 32000)
    step_cfg = StepConfig(micro_batch_tokens=budget, logprob_chunk_size=1024)
    metrics = grpo_step(model, optimizer, batch, step_cfg)  # ballast still held
    per_micro = max(budget // seq_len, 1)
    assert metrics["train/micro_batches"] == math.ceil(32 / per_micro)
    assert metrics["train/skipped"] == 0.0 and math.isfinite(metrics["train/grad_norm"])
    del ballast


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("norm", ["sequence", "token", "constant"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_token_split_equals_whole_batch_on_cuda(norm, level):
    from test_step import grads_after_step  # tests/ is on sys.path under pytest

    torch.backends.cuda.matmul.allow_tf32 = False
    full, full_metrics = grads_after_step(norm, micro=6, level=level, device="cuda")
    split, split_metrics = grads_after_step(norm, micro=6, level=level, tokens=16,
                                            device="cuda")
    assert split_metrics["train/micro_batches"] == 3
    for a, b in zip(full, split):
        assert a.is_cuda
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert split_metrics["policy/loss"] == pytest.approx(full_metrics["policy/loss"], rel=1e-4)
