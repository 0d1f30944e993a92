"""fp32 master weights under bf16 parameters: updates at RL learning rates are kept.

The core check feeds a bf16 run and an fp32 run the same gradients from the same
(bf16-rounded) start, so the only difference left is where the update is rounded; the
masters must then move as the fp32 weights do, and the model must hold the masters rounded
to bf16. With master weights off the same bf16 run barely moves, which shows the check can
fail.
"""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch

from example_trainer.master_weights import MasterWeightsOptimizer
from example_trainer.offload_adamw import CPUOffloadAdamW
from example_trainer.optim import (OPTIMIZERS, _bnb_cpu_error, build_optimizer,
                                   build_scheduler, optimizer_state_bytes)

LR = 1e-6
STEPS = 20
BF16 = torch.bfloat16


def _needs_bnb(name: str) -> None:
    if name == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
        why = _bnb_cpu_error()
        if why is not None:
            pytest.skip(f"bitsandbytes cannot run 8-bit AdamW on CPU here: {why}")


def _model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Sequential:
    """Two linears (8192 and 4096 weights: bitsandbytes' 8-bit path) with weights ~0.02,
    rounded to bf16 first so every dtype starts from the same values."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
            p.copy_(p.to(BF16))
    return model.to(dtype)


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 64, generator=gen), torch.randn(32, 32, generator=gen))
            for _ in range(n)]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dtype = model[0].weight.dtype
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def _fixed_grads(n: int = STEPS) -> list[list[torch.Tensor]]:
    """n gradient sets from the fp32 start model on n batches, rounded to bf16 so a bf16
    parameter can take them unchanged: both runs then see bit-identical gradients."""
    model = _model(torch.float32)
    out = []
    for x, y in _batches(n):
        model.zero_grad()
        _loss(model, x, y).backward()
        out.append([p.grad.to(BF16) for p in model.parameters()])
    return out


def _master(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    """Where the unrounded value of ``p`` lives for this optimizer."""
    if isinstance(opt, MasterWeightsOptimizer):
        return opt.master(p)
    if isinstance(opt, CPUOffloadAdamW) and "master" in opt.state[p]:
        return opt.state[p]["master"]
    return p


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def _train_on(model: torch.nn.Module, opt: torch.optim.Optimizer,
              grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(model.parameters(), step_grads):
            p.grad = g.to(p.dtype)
        opt.step()
        opt.zero_grad()


def _displacements(name: str, master_weights: bool | None, grads
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module,
                              torch.optim.Optimizer]:
    """(fp32 run's displacement, bf16 run's master displacement, bf16 model, its optimizer)."""
    start = _flat(_model(torch.float32).parameters())
    ref = _model(torch.float32)
    _train_on(ref, build_optimizer(name, ref.parameters(), lr=LR), grads)
    model = _model(BF16)
    opt = build_optimizer(name, model.parameters(), lr=LR, master_weights=master_weights)
    _train_on(model, opt, grads)
    moved = _flat(_master(opt, p) for p in model.parameters()) - start
    return _flat(ref.parameters()) - start, moved, model, opt


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / b.abs().sum())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bf16_masters_move_like_fp32(name: str) -> None:
    _needs_bnb(name)
    want, got, model, opt = _displacements(name, None, _fixed_grads())
    assert want.abs().sum() > 0
    # Same gradients, same fp32 arithmetic on the masters: measured 0 (adamw_cpu 2e-8).
    assert _rel_l1(got, want) <= 0.01, _rel_l1(got, want)
    for p in model.parameters():
        m = _master(opt, p)
        assert p.dtype == BF16 and m.dtype == torch.float32 and m.device == p.device
        assert torch.equal(p.detach(), m.to(BF16))
    if name == "adamw_cpu":
        assert isinstance(opt, CPUOffloadAdamW)  # has its own masters: never wrapped
    else:
        assert isinstance(opt, MasterWeightsOptimizer)
        # the masters kept what bf16 cannot hold
        assert not torch.equal(opt.master(model[0].weight),
                               opt.master(model[0].weight).to(BF16).float())


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "adafactor"])
def test_without_masters_bf16_loses_most_of_the_update(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    """The failure the masters fix: 20 steps at lr 1e-6 on bf16 weights ~0.02."""
    _needs_bnb(name)
    with caplog.at_level(logging.WARNING, logger="example_trainer.optim"):
        want, got, _, opt = _displacements(name, False, _fixed_grads())
    assert not isinstance(opt, MasterWeightsOptimizer)
    assert "round away" in caplog.text
    ratio = float(got.abs().sum() / want.abs().sum())
    assert ratio < 0.5, ratio  # measured: adamw 0.015, adamw_8bit 0.016, adafactor 0.036


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_end_to_end_bf16_forward(name: str) -> None:
    """bf16 forward and backward (so gradients differ from the fp32 run's): the masters
    still follow the fp32 run closely, and far closer than bf16 without masters."""
    _needs_bnb(name)
    start = _flat(_model(torch.float32).parameters())
    batches = _batches(STEPS)

    def run(dtype: torch.dtype, master_weights: bool | None) -> torch.Tensor:
        model = _model(dtype)
        opt = build_optimizer(name, model.parameters(), lr=LR, master_weights=master_weights)
        for x, y in batches:
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        return _flat(_master(opt, p) for p in model.parameters()) - start

    want = run(torch.float32, None)
    got = run(BF16, None)
    # measured 0.0036 (adamw, adamw_cpu, adafactor), 0.014 (adamw_8bit: its quantised
    # moments amplify the bf16 forward's gradient noise); without masters 0.99
    assert _rel_l1(got, want) <= 0.03, _rel_l1(got, want)
    if name != "adamw_cpu":
        lost = run(BF16, False)
        assert _rel_l1(lost, want) > 0.5, _rel_l1(lost, want)


def test_step_hooks_fire_around_the_write_back() -> None:
    model = _model(BF16)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2)
    w = model[0].weight
    seen = []
    opt.register_step_pre_hook(lambda *_: seen.append(("pre", w.detach().clone())))
    opt.register_step_post_hook(lambda *_: seen.append(("post", w.detach().clone())))
    before = w.detach().clone()
    _train_on(model, opt, _fixed_grads(2))
    assert [s for s, _ in seen] == ["pre", "post", "pre", "post"]
    assert torch.equal(seen[0][1], before)
    # post hooks (shared_vllm resumes vLLM there) already see the rounded new weights
    assert not torch.equal(seen[1][1], before)
    assert torch.equal(seen[3][1], w.detach())


def test_scheduler_and_param_groups_reach_the_inner_optimizer() -> None:
    """Two groups with their own lr under a warm-up + cosine schedule: the masters equal
    an fp32 AdamW run with the same schedule, step for step, bit for bit."""
    model, ref = _model(BF16), _model(torch.float32)

    def groups(m: torch.nn.Module) -> list[dict]:
        return [{"params": list(m[0].parameters())},
                {"params": list(m[2].parameters()), "lr": 3e-3, "weight_decay": 0.0}]

    opt = build_optimizer("adamw", groups(model), lr=1e-2, weight_decay=0.1)
    ref_opt = build_optimizer("adamw", groups(ref), lr=1e-2, weight_decay=0.1)
    assert isinstance(opt, MasterWeightsOptimizer)
    sched = build_scheduler(opt, warmup_steps=3, total_steps=8, schedule="cosine")
    ref_sched = build_scheduler(ref_opt, warmup_steps=3, total_steps=8, schedule="cosine")
    lrs = []
    for step_grads in _fixed_grads(8):
        lrs.append([g["lr"] for g in opt.param_groups])
        for m in (model, ref):
            for p, g in zip(m.parameters(), step_grads):
                p.grad = g.to(p.dtype)
        opt.step()
        ref_opt.step()
        assert [g["lr"] for g in opt.inner.param_groups] == lrs[-1]
        for p, r in zip(model.parameters(), ref.parameters()):
            assert torch.equal(opt.master(p), r.detach())
        sched.step()
        ref_sched.step()
    # warm-up 1/3, 2/3, then peak twice, then cosine decay: the inner saw every change
    assert len({tuple(x) for x in lrs}) == len(lrs) - 1
    assert lrs[0][1] == pytest.approx(3e-3 / 3)


def test_zero_grad_clears_the_model_grads() -> None:
    model = _model(BF16)
    opt = build_optimizer("adamw", model.parameters(), lr=LR)
    _loss(model, *_batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _loss(model, *_batches(1)[0]).backward()
    opt.step()
    assert all(opt.master(p).grad is None for p in model.parameters())  # transient


def _save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "adafactor"])
def test_resume_continues_exactly(name: str) -> None:
    """Save after 3 steps, resume into a fresh model (the bf16 weights a checkpoint holds)
    and optimizer: the next 3 steps equal an uninterrupted run's, masters included."""
    _needs_bnb(name)
    grads = _fixed_grads(6)
    model = _model(BF16)
    opt = build_optimizer(name, model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6, schedule="linear")

    def run(m, o, s, gs) -> None:
        for step_grads in gs:
            for p, g in zip(m.parameters(), step_grads):
                p.grad = g
            o.step()
            s.step()
            o.zero_grad()

    run(model, opt, sched, grads[:3])
    saved = _save_load({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    assert all("master" in saved["optimizer"]["state"][i] for i in range(4))
    model2 = copy.deepcopy(model)
    opt2 = build_optimizer(name, model2.parameters(), lr=1e-3, weight_decay=0.01)
    sched2 = build_scheduler(opt2, warmup_steps=2, total_steps=6, schedule="linear")
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.master(p), opt2.master(p2))
        assert opt2.master(p2).dtype == torch.float32
        assert opt2.master(p2).data_ptr() != opt.master(p).data_ptr()
    run(model, opt, sched, grads[3:])
    run(model2, opt2, sched2, grads[3:])
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2) and torch.equal(opt.master(p), opt2.master(p2))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_resume_from_a_checkpoint_without_masters() -> None:
    """A checkpoint of plain bf16 AdamW: masters start from the parameters, moments load
    (as fp32), and training continues."""
    grads = _fixed_grads(4)
    model = _model(BF16)
    plain = build_optimizer("adamw", model.parameters(), lr=1e-3, master_weights=False)
    _train_on(model, plain, grads[:2])
    saved = _save_load(plain.state_dict())
    opt = build_optimizer("adamw", model.parameters(), lr=1e-3)
    _train_on(model, opt, grads[2:3])  # masters now differ from the parameters
    opt.load_state_dict(saved)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(opt.master(p), p.detach().float())
        inner = opt.inner.state[opt.master(p)]
        assert inner["exp_avg"].dtype == torch.float32
        assert torch.equal(inner["exp_avg"], saved["state"][i]["exp_avg"].float())
        assert float(inner["step"]) == 2
    _train_on(model, opt, grads[3:])
    assert float(opt.inner.state[opt.master(model[0].weight)]["step"]) == 3


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "adafactor"])
def test_view_parameter_stays_a_view(name: str) -> None:
    """shared_vllm's parameters are (transposed) slices of vLLM's tensors: the update must
    land in that memory, never in a replacement tensor."""
    _needs_bnb(name)
    torch.manual_seed(0)
    base = (torch.randn(64, 160) * 0.02).to(BF16)
    base0 = base.clone()
    view = torch.nn.Parameter(base[:, 16:144].t())  # 8192 elements, non-contiguous
    dense = torch.nn.Parameter((torch.randn(32) * 0.02).to(BF16))
    ptr = view.data_ptr()
    assert not view.is_contiguous() and ptr == base[:, 16:144].data_ptr()
    opt = build_optimizer(name, [view, dense], lr=1e-2)
    assert isinstance(opt, MasterWeightsOptimizer)
    for _ in range(3):
        view.grad = torch.randn(view.shape).to(BF16)
        dense.grad = torch.randn(32).to(BF16)
        opt.step()
    assert view.data_ptr() == ptr and view.stride() == (1, 160)
    assert torch.equal(base[:, 16:144].t(), view.detach())
    assert torch.equal(view.detach(), opt.master(view).to(BF16))
    assert not torch.equal(base[:, 16:144], base0[:, 16:144])
    assert torch.equal(base[:, :16], base0[:, :16]) and torch.equal(base[:, 144:],
                                                                     base0[:, 144:])


def test_who_gets_masters() -> None:
    fp32 = torch.nn.Linear(4, 4)
    assert isinstance(build_optimizer("adamw", fp32.parameters(), lr=LR), torch.optim.AdamW)
    assert not isinstance(build_optimizer("adamw", fp32.parameters(), lr=LR,
                                          master_weights=True), MasterWeightsOptimizer)
    bf16 = torch.nn.Linear(4, 4).to(BF16)
    assert isinstance(build_optimizer("adamw_cpu", bf16.parameters(), lr=LR), CPUOffloadAdamW)
    assert isinstance(build_optimizer("adamw", bf16.parameters(), lr=LR,
                                      master_weights=True), MasterWeightsOptimizer)
    # LoRA: frozen bf16 base, fp32 adapter (as peft keeps it): nothing to wrap
    bf16.weight.requires_grad_(False)
    bf16.bias.requires_grad_(False)
    adapter = torch.nn.Parameter(torch.zeros(4, 4))
    opt = build_optimizer("adamw", [*bf16.parameters(), adapter], lr=LR)
    assert isinstance(opt, torch.optim.AdamW)
    # mixed: the bf16 weight gets a master, the fp32 bias is its own
    weight = torch.nn.Parameter(torch.randn(4, 4).to(BF16))
    bias = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer("adamw", [weight, bias], lr=1e-2)
    assert isinstance(opt, MasterWeightsOptimizer)
    assert opt.master(bias) is bias and opt.master(weight) is not weight
    (weight.float() @ torch.ones(4) + bias).sum().backward()
    opt.step()
    assert torch.equal(bias.detach(), torch.full((4,), -1e-2))  # AdamW's first step: -lr


def test_state_bytes_count_the_masters() -> None:
    model = torch.nn.Linear(10, 5).to(BF16)  # 55 parameters: masters 220 B
    opt = build_optimizer("adamw", model.parameters(), lr=0.1)
    assert optimizer_state_bytes(opt) == {"cpu": 220, "accelerator": 0}
    model(torch.ones(2, 10, dtype=BF16)).float().sum().backward()
    opt.step()
    assert optimizer_state_bytes(opt) == {"cpu": 220 + 2 * 220, "accelerator": 0}
