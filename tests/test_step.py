"""grpo_step: micro-batching (by sequences or by tokens) must not change the update, for
every normalisation; the accumulate/update seam, the optional optimizer hooks, and
activation checkpointing."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from example_trainer.batch import collate_groups
from example_trainer.config import TrainConfig
from example_trainer.step import StepConfig, accumulate_gradients, apply_update, grpo_step


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


def grads_after_step(norm: str, micro: int, level: str = "token", tokens: int = 0,
                     device: str = "cpu"):
    """Gradients reaching optimizer.step() and the metrics of one step."""
    model = tiny_llama().to(device)
    loss_name = {"token": "grpo", "sequence": "gspo", "sequence_token": "gspo_token"}[level]
    cfg = TrainConfig(batch_size=6, micro_batch_size=micro, norm=norm, loss=loss_name,
                      max_grad_norm=0.0, lr=1.0)
    step_cfg = StepConfig.from_config(cfg, micro_batch_tokens=tokens)
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    captured[id(p)] = p.grad.clone()

    optimizer = Capture(model.parameters(), lr=1.0)
    metrics = grpo_step(model, optimizer, varied_batch(), step_cfg)
    return [captured[id(p)] for p in model.parameters()], metrics


# varied_batch() has sequence lengths [5, 8, 8, 3, 7, 7] (padded T = 8). Token budgets:
# 1 -> every sequence alone; 16 -> rows [1, 2], [4, 5], [0, 3] (padded 16, 14, 10 tokens);
# 24 -> [1, 2, 4], [0, 3, 5]; 48 -> all six in one micro-batch.
SPLITS = [("size", 2), ("tokens", 1), ("tokens", 16), ("tokens", 24), ("tokens", 48)]


@pytest.mark.parametrize("split", SPLITS, ids=[f"{k}{v}" for k, v in SPLITS])
@pytest.mark.parametrize("norm", ["sequence", "token", "constant"])
@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_micro_batched_gradients_equal_full_batch(norm, level, split):
    kind, value = split
    full, full_metrics = grads_after_step(norm, micro=6, level=level)
    micro, micro_metrics = (grads_after_step(norm, micro=value, level=level) if kind == "size"
                            else grads_after_step(norm, micro=6, level=level, tokens=value))
    expected_micro_batches = {("size", 2): 3, ("tokens", 1): 6, ("tokens", 16): 3,
                              ("tokens", 24): 2, ("tokens", 48): 1}[split]
    assert micro_metrics["train/micro_batches"] == expected_micro_batches
    assert full_metrics["train/micro_batches"] == 1
    for a, b in zip(full, micro):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert micro_metrics["policy/loss"] == pytest.approx(full_metrics["policy/loss"], rel=1e-4)
    assert micro_metrics["train/grad_norm"] == pytest.approx(full_metrics["train/grad_norm"],
                                                             rel=1e-4)
    assert any(g.abs().sum() > 0 for g in full)


def test_step_config_takes_the_step_fields_of_a_train_config():
    cfg = TrainConfig(loss="gspo", norm="token", kl_coef=0.05, logprob_chunk_size=64,
                      micro_batch_size=3, micro_batch_tokens=-1, max_grad_norm=0.5)
    step_cfg = StepConfig.from_config(cfg)
    # gspo defaults to eps (3e-4, 4e-4); auto (-1) unresolved means "split by size".
    assert step_cfg == StepConfig(level="sequence", eps_low=3e-4, eps_high=4e-4, norm="token",
                                  kl_coef=0.05, logprob_chunk_size=64, micro_batch_size=3,
                                  micro_batch_tokens=0, max_grad_norm=0.5)
    assert StepConfig.from_config(cfg, micro_batch_tokens=4096).micro_batch_tokens == 4096
    assert StepConfig.from_config(TrainConfig(eps_low=0.1)).eps_low == 0.1
    with pytest.raises(dataclasses.FrozenInstanceError):
        step_cfg.norm = "sequence"  # type: ignore[misc]
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        StepConfig(micro_batch_tokens=-1)


def test_accumulate_then_apply_equals_grpo_step():
    step_cfg = StepConfig(micro_batch_size=4, max_grad_norm=1.0)
    stepped, split = tiny_llama(), tiny_llama()
    opt_a = torch.optim.AdamW(stepped.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(split.parameters(), lr=1e-2)
    whole = grpo_step(stepped, opt_a, varied_batch(), step_cfg)
    first = accumulate_gradients(split, varied_batch(), step_cfg)
    assert all(p.grad is not None for p in split.parameters())  # nothing applied yet
    second = apply_update(split, opt_b, step_cfg)
    assert all(p.grad is None for p in split.parameters())
    assert {**first, **second} == whole
    for a, b in zip(stepped.parameters(), split.parameters()):
        assert torch.equal(a, b)


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


class HookedSGD(torch.optim.SGD):
    """SGD with the optional hooks an offload optimizer may provide, recording their use."""

    def __init__(self, params, norm: float | None = None):
        super().__init__(params, lr=0.1)
        self.inside_last_backward = False
        self.clip_calls: list[float] = []
        self.steps = 0
        self.norm = norm

    @contextlib.contextmanager
    def last_backward(self):
        self.inside_last_backward = True
        try:
            yield
        finally:
            self.inside_last_backward = False

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        self.clip_calls.append(max_norm)
        return torch.tensor(self.norm)

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_last_backward_wraps_only_the_final_micro_batch():
    model = tiny_llama()
    optimizer = HookedSGD(model.parameters(), norm=1.0)
    seen: list[bool] = []
    # The embedding takes part in every micro-batch, so its hook fires once per backward.
    model.get_input_embeddings().weight.register_hook(
        lambda grad: seen.append(optimizer.inside_last_backward))
    metrics = grpo_step(model, optimizer, varied_batch(), StepConfig(micro_batch_size=2))
    assert metrics["train/micro_batches"] == 3
    assert seen == [False, False, True]


@pytest.mark.parametrize("max_grad_norm, expected_max_norm", [(0.5, 0.5), (0.0, math.inf)])
def test_optimizer_clip_grad_norm_replaces_torch_clipping(max_grad_norm, expected_max_norm):
    model = tiny_llama()
    optimizer = HookedSGD(model.parameters(), norm=2.5)
    before = [p.detach().clone() for p in model.parameters()]
    step_cfg = StepConfig(micro_batch_size=6, max_grad_norm=max_grad_norm)
    accumulate_gradients(model, varied_batch(), step_cfg, optimizer)
    grads = [p.grad.clone() for p in model.parameters()]
    metrics = apply_update(model, optimizer, step_cfg)
    assert optimizer.clip_calls == [expected_max_norm]
    assert metrics["train/grad_norm"] == 2.5 and metrics["train/skipped"] == 0.0
    # torch's clipping did not run: SGD moved each parameter by exactly lr * unclipped grad.
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


@pytest.mark.parametrize("norm", [float("nan"), float("inf")])
def test_non_finite_norm_skips_the_step_but_not_the_schedule(norm):
    model = tiny_llama()
    optimizer = HookedSGD(model.parameters(), norm=norm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = grpo_step(model, optimizer, varied_batch(), StepConfig(micro_batch_size=6),
                        scheduler)
    assert metrics["train/skipped"] == 1.0 and optimizer.steps == 0
    assert metrics["train/lr"] == 0.1 and scheduler.last_epoch == 1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


# --- activation checkpointing ----------------------------------------------------------


def step_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    """Gradients of one accumulated batch (trainable parameters, in order)."""
    accumulate_gradients(model, varied_batch(), StepConfig(micro_batch_size=4))
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def count_layer_forwards(model: torch.nn.Module) -> list[int]:
    """Counts runs of the first decoder layer's forward (forward hooks do not fire on the
    checkpoint's recomputation, so wrap forward itself)."""
    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
    calls = [0]
    forward = layer.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    layer.forward = counting
    return calls


def test_grad_checkpointing_gives_the_same_gradients(tiny_model_dir):
    from example_trainer.model import load_model
    cfg = TrainConfig(model=str(tiny_model_dir), device="cpu", dtype="float32")
    plain, _ = load_model(cfg)
    ckpt, _ = load_model(dataclasses.replace(cfg, grad_checkpointing=True))
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    plain_calls, ckpt_calls = count_layer_forwards(plain), count_layer_forwards(ckpt)
    expected, got = step_grads(plain), step_grads(ckpt)
    # Two micro-batches: each layer runs once per micro-batch, and again in backward.
    assert plain_calls == [2] and ckpt_calls == [4]
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("before_wrap", [True, False])
def test_grad_checkpointing_gives_lora_the_same_gradients(tiny_model_dir, before_wrap):
    from peft import LoraConfig, get_peft_model
    from example_trainer.model import enable_grad_checkpointing, load_model

    def lora_model(checkpointing: bool) -> torch.nn.Module:
        base, _ = load_model(TrainConfig(model=str(tiny_model_dir), device="cpu",
                                         dtype="float32"))
        if checkpointing and before_wrap:  # load_model's order
            enable_grad_checkpointing(base)
        torch.manual_seed(0)
        # Random A and B (not B = 0), so both get a non-zero gradient.
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                target_modules=["q_proj", "v_proj"]))
        if checkpointing and not before_wrap:
            enable_grad_checkpointing(model)
        return model

    plain, ckpt = lora_model(False), lora_model(True)
    ckpt_calls = count_layer_forwards(ckpt)
    expected, got = step_grads(plain), step_grads(ckpt)
    assert ckpt_calls == [4]  # recomputed in backward
    assert len(got) == 8  # lora_A and lora_B of q_proj and v_proj in both layers
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5])
def test_cpu_offload_optimizer_through_the_hooks_equals_adamw(max_grad_norm):
    """The contract end to end: last_backward and clip_grad_norm_ of CPUOffloadAdamW, used by
    the step, give exactly torch's AdamW with torch's clipping (two steps, three micro-batches
    each; norms are ~1.03, so 0.5 clips)."""
    from example_trainer.offload_adamw import CPUOffloadAdamW
    reference, offloaded = tiny_llama(), tiny_llama()
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    offload = CPUOffloadAdamW(offloaded.parameters(), lr=1e-2)
    step_cfg = StepConfig(micro_batch_size=2, max_grad_norm=max_grad_norm)
    for _ in range(2):
        expected = grpo_step(reference, adamw, varied_batch(), step_cfg)
        got = grpo_step(offloaded, offload, varied_batch(), step_cfg)
        assert got["train/grad_norm"] == expected["train/grad_norm"]
    for a, b in zip(reference.parameters(), offloaded.parameters()):
        assert torch.equal(a, b)
