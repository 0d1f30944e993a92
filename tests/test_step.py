"""grpo_step: micro-batching must not change the update, for every normalisation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from example_trainer.batch import collate_groups
from example_trainer.config import TrainConfig
from example_trainer.step import grpo_step


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def varied_batch():
    groups = []
    for g, (p, lens) in enumerate([(3, [2, 5]), (2, [6, 1]), (4, [3, 3])]):
        tokens, masks, old = [], [], []
        for i, n in enumerate(lens):
            seq = [(7 * g + 3 * i + k) % 60 + 2 for k in range(p + n)]
            tokens.append(seq)
            masks.append([-100] * p + seq[p:])
            old.append([1.0] * p + [-4.0 + 0.1 * k for k in range(n)])
        groups.append({"tokens": tokens, "masks": masks, "scores": [float(g % 2), 1.0 - g % 2],
                       "inference_logprobs": old})
    return collate_groups(groups, pad_id=0)


def grads_after_step(norm: str, micro: int, level: str = "token"):
    model = tiny_llama()
    loss_name = {"token": "grpo", "sequence": "gspo"}[level]
    cfg = TrainConfig(batch_size=6, micro_batch_size=micro, norm=norm, loss=loss_name,
                      max_grad_norm=0.0, lr=1.0)
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    captured[id(p)] = p.grad.clone()

    optimizer = Capture(model.parameters(), lr=1.0)
    metrics = grpo_step(model, optimizer, varied_batch(), cfg)
    return [captured[id(p)] for p in model.parameters()], metrics


@pytest.mark.parametrize("norm", ["sequence", "token", "constant"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_micro_batched_gradients_equal_full_batch(norm, level):
    full, full_metrics = grads_after_step(norm, micro=6, level=level)
    micro, micro_metrics = grads_after_step(norm, micro=2, level=level)
    for a, b in zip(full, micro):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert micro_metrics["policy/loss"] == pytest.approx(full_metrics["policy/loss"], rel=1e-4)
    assert micro_metrics["train/grad_norm"] == pytest.approx(full_metrics["train/grad_norm"],
                                                             rel=1e-4)
    assert any(g.abs().sum() > 0 for g in full)


def test_step_changes_weights_and_reports_metrics():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(batch_size=6, micro_batch_size=4, lr=1e-2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    metrics = grpo_step(model, optimizer, varied_batch(), cfg)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert metrics["train/sequences"] == 6 and metrics["train/tokens"] == 20
    assert metrics["train/skipped"] == 0.0 and metrics["train/grad_norm"] > 0
    assert 0 < metrics["policy/entropy"] < torch.log(torch.tensor(64.0)) + 1e-4
    assert metrics["policy/logprob_gap_max"] >= metrics["policy/logprob_gap_mean"] > 0


def test_kl_without_reference_is_a_clear_error():
    cfg = TrainConfig(batch_size=6, micro_batch_size=6, kl_coef=0.1)
    model = tiny_llama()
    with pytest.raises(ValueError, match="reference policy"):
        grpo_step(model, torch.optim.SGD(model.parameters(), lr=0.1), varied_batch(), cfg)
