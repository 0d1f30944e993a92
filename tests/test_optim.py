"""Optimizer registry, the CPU-offload AdamW's exactness and checkpointing, LR schedules."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

from example_trainer.optim import (OPTIMIZERS, SCHEDULES, CPUOffloadAdamW, OptionalDependencyError,
                                   build_optimizer, build_scheduler, optimizer_state_bytes)


def _mlp(seed: int = 0) -> torch.nn.Module:
    # 32x128 = 4096 elements: at bitsandbytes' min_8bit_size, so its 8-bit path runs.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 32, generator=gen)
    y = torch.tanh(x @ torch.randn(32, 1, generator=gen) / 4)
    return x, y


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
           data: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
    x, y = data
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_reduces_loss(name: str) -> None:
    model = _mlp()
    opt = build_optimizer(name, model.parameters(), lr=1e-2)
    losses = _train(model, opt, 30, _data())
    if name == "adamw_8bit":  # the first layer's moments really are quantised
        assert opt.state[model[0].weight]["state1"].dtype == torch.uint8
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.3 * losses[0], losses


def _ref_params() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 5, generator=gen), torch.randn(6, 10, generator=gen)


def test_adamw_cpu_matches_torch_adamw_including_noncontiguous_view() -> None:
    w0, base0 = _ref_params()
    b0 = torch.linspace(-1, 1, 8)

    # Ours: `v` is a Parameter over a transposed slice of `base`, sharing its memory.
    base = base0.clone()
    w = torch.nn.Parameter(w0.clone())
    v = torch.nn.Parameter(base[:, 2:7].t())
    b = torch.nn.Parameter(b0.clone())
    assert not v.is_contiguous() and v.data_ptr() == base[:, 2:7].data_ptr()
    ref_w = torch.nn.Parameter(w0.clone())
    ref_v = torch.nn.Parameter(base0[:, 2:7].t().contiguous())
    ref_b = torch.nn.Parameter(b0.clone())

    kw = dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = build_optimizer("adamw_cpu", [{"params": [w, v]}, {"params": [b], "lr": 0.02,
                                                             "weight_decay": 0.0}], lr=0.05, **kw)
    assert isinstance(opt, CPUOffloadAdamW)
    ref = torch.optim.AdamW([{"params": [ref_w, ref_v]}, {"params": [ref_b], "lr": 0.02,
                                                          "weight_decay": 0.0}],
                            lr=0.05, foreach=False, **kw)
    sched = build_scheduler(opt, warmup_steps=3, total_steps=10, schedule="cosine")
    ref_sched = build_scheduler(ref, warmup_steps=3, total_steps=10, schedule="cosine")

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    seen_lrs = set()
    for _ in range(10):
        for params, o in (((w, v, b), opt), ((ref_w, ref_v, ref_b), ref)):
            pw, pv, pb = params
            loss = ((torch.tanh(x @ pv.t()) @ pw.t() + pb) ** 2).mean() + pv.sum() * 0.1
            o.zero_grad()
            loss.backward()
            o.step()
        seen_lrs.add(opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        sched.step()
        ref_sched.step()
        for ours, theirs in ((w, ref_w), (v, ref_v), (b, ref_b)):
            torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=0)
    assert len(seen_lrs) >= 8  # the scheduler really changed lr between steps
    # The update landed in the shared base memory, and nothing else of `base` moved.
    assert v.data_ptr() == base[:, 2:7].data_ptr()
    torch.testing.assert_close(base[:, 2:7].t(), ref_v.detach(), atol=1e-6, rtol=0)
    assert not torch.equal(base[:, 2:7], base0[:, 2:7])
    assert torch.equal(base[:, :2], base0[:, :2]) and torch.equal(base[:, 7:], base0[:, 7:])
    assert "master" not in opt.state[v]  # fp32 CPU parameters are their own master


def test_adamw_cpu_bf16_param_keeps_fp32_master() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 16).to(torch.bfloat16))
    opt = CPUOffloadAdamW([p], lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        p.grad = torch.randn(16, 16).to(torch.bfloat16)
        opt.step()
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32 and master.device.type == "cpu"
    assert torch.equal(p.detach(), master.to(torch.bfloat16))
    # lr 1e-3 updates are below bf16 resolution for many entries; the master keeps them.
    assert not torch.equal(master, master.to(torch.bfloat16).float())
    # master + two moments, plus the fp32 scratch the bf16 grads are widened into
    assert opt.state_bytes() == {"cpu": 4 * 16 * 16 * 4, "accelerator": 0}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    model = _mlp()
    if name == "adamw_cpu":  # exercise the fp32 master of a low-precision parameter too
        model[2].to(torch.bfloat16)
    data = _data()
    x, y = data

    def run(m: torch.nn.Module, o: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            h = m[1](m[0](x))
            out = m[2](h.to(m[2].weight.dtype)).float()
            loss = torch.nn.functional.mse_loss(out, y)
            o.zero_grad()
            loss.backward()
            o.step()

    opt = build_optimizer(name, model.parameters(), lr=1e-2, weight_decay=0.01)
    run(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = build_optimizer(name, model2.parameters(), lr=1e-2, weight_decay=0.01)
    opt2.load_state_dict(saved)
    if name == "adamw_cpu":
        st = opt2.state[model2[2].weight]
        assert st["master"].dtype == torch.float32
        assert torch.equal(st["master"], opt.state[model[2].weight]["master"])
        assert st["exp_avg"].data_ptr() != opt.state[model[2].weight]["exp_avg"].data_ptr()
    run(model, opt, 3)
    run(model2, opt2, 3)
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    assert not torch.equal(model[0].weight, _mlp()[0].weight)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_optimizer("sgd_plus", [torch.nn.Parameter(torch.ones(2))], lr=0.1)
    for name in OPTIMIZERS:
        assert name in str(info.value)


def test_adamw_never_fused_on_cpu_views() -> None:
    base = torch.randn(6, 10)
    view = torch.nn.Parameter(base[:, 2:7].t())
    dense = torch.nn.Parameter(torch.randn(3, 3))
    for params in ([view], [dense], [view, dense]):
        opt = build_optimizer("adamw", params, lr=0.1)
        assert isinstance(opt, torch.optim.AdamW)
        assert not opt.defaults["fused"]
        assert opt.defaults["foreach"] is True


def test_only_trainable_params_are_passed_on() -> None:
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    live = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer("adamw", [frozen, live], lr=0.1)
    assert [p for g in opt.param_groups for p in g["params"]] == [live]
    opt = build_optimizer("adamw_cpu", [{"params": [frozen]}, {"params": [frozen, live],
                                                               "lr": 0.5}], lr=0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [live]
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(ValueError):
        build_optimizer("adamw", [frozen], lr=0.1)


def test_adamw_8bit_refuses_noncontiguous_and_reports_missing_package(
        monkeypatch: pytest.MonkeyPatch) -> None:
    view = torch.nn.Parameter(torch.randn(6, 10)[:, 2:7].t())
    with pytest.raises(ValueError, match="non-contiguous"):
        build_optimizer("adamw_8bit", [view], lr=0.1)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import` raise
    with pytest.raises(ImportError, match="pip install bitsandbytes") as info:
        build_optimizer("adamw_8bit", [torch.nn.Parameter(torch.ones(4))], lr=0.1)
    assert isinstance(info.value, OptionalDependencyError)


def _lrs(schedule: str, steps: int, warmup: int = 4, total: int = 12) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sched = build_scheduler(opt, warmup, total, schedule)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_scheduler_values_by_hand() -> None:
    assert SCHEDULES == ("constant", "linear", "cosine")
    lin = _lrs("linear", 15)
    # warm-up (step+1)/4, then 1 - (step-4)/8, reaching 0 at step 12 and staying there
    for step, want in {0: 0.025, 1: 0.05, 3: 0.1, 4: 0.1, 6: 0.075, 8: 0.05, 12: 0.0,
                       14: 0.0}.items():
        assert lin[step] == pytest.approx(want, abs=1e-12), step
    cos = _lrs("cosine", 13)
    for step, want in {0: 0.025, 4: 0.1, 6: 0.05 * (1 + math.cos(math.pi / 4)), 8: 0.05,
                       12: 0.0}.items():
        assert cos[step] == pytest.approx(want, abs=1e-12), step
    const = _lrs("constant", 50)
    assert const[0] == pytest.approx(0.025) and const[3] == const[49] == pytest.approx(0.1)
    assert _lrs("linear", 2, warmup=0, total=4) == pytest.approx([0.1, 0.075])
    with pytest.raises(ValueError, match="constant"):
        _lrs("step", 1)


def test_scheduler_state_dict_round_trip() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sched = build_scheduler(opt, 2, 10, "cosine")
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    sched2 = build_scheduler(opt2, 0, 0, "constant")
    sched2.load_state_dict(sched.state_dict())
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 0.1


def test_optimizer_state_bytes_by_hand() -> None:
    model = torch.nn.Linear(10, 5)  # 55 fp32 parameters = 220 bytes
    for name in ("adamw", "adamw_cpu"):
        opt = build_optimizer(name, model.parameters(), lr=0.1)
        assert optimizer_state_bytes(opt) == {"cpu": 0, "accelerator": 0}
        model(torch.ones(2, 10)).sum().backward()
        opt.step()
        assert optimizer_state_bytes(opt) == {"cpu": 2 * 220, "accelerator": 0}
    assert opt.state_bytes() == {"cpu": 440, "accelerator": 0}
