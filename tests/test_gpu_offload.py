"""CPUOffloadAdamW on CUDA: exact against torch's fused CPU AdamW on fp32 copies, copies that
start during backward, no optimizer state in GPU memory. Skipped without CUDA."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from example_trainer.offload_adamw import CPUOffloadAdamW

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

KW = dict(betas=(0.8, 0.95), eps=1e-6)
MAX_NORM = 0.5


def _params(dtype: torch.dtype) -> tuple[list[torch.nn.Parameter], torch.Tensor]:
    """A 3-layer MLP's weights on CUDA; the first is a transposed slice of ``base``."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(48, 70, generator=gen).to("cuda", dtype)
    ps = [torch.nn.Parameter(base[:, 3:67].t()),  # (64, 48) strided view
          torch.nn.Parameter(torch.randn(300, 48, generator=gen).to("cuda", dtype) / 8),
          torch.nn.Parameter(torch.randn(300, generator=gen).to("cuda", dtype)),
          torch.nn.Parameter(torch.randn(10, 300, generator=gen).to("cuda", dtype) / 16)]
    return ps, base


def _loss(ps: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w0, w1, b1, w2 = ps
    h = torch.tanh(x.to(w0.dtype) @ w0)
    h = torch.tanh(h @ w1.t() + b1)
    return ((h @ w2.t()).float() ** 2).mean()


def _groups(ps: list[torch.Tensor]) -> list[dict]:
    return [{"params": ps[:3], "lr": 0.03, "weight_decay": 0.1},
            {"params": ps[3:], "lr": 0.01, "weight_decay": 0.0}]


def _backward(ps: list[torch.Tensor], opt: CPUOffloadAdamW | None, step: int,
              poison: bool = False, contract: bool = True) -> None:
    """Three micro-batches; the last inside ``last_backward()`` when ``contract``."""
    gen = torch.Generator().manual_seed(100 + step)
    for i in range(3):
        x = torch.randn(32, 64, generator=gen).cuda()
        ctx = opt.last_backward() if (opt is not None and contract and i == 2) \
            else contextlib.nullcontext()
        with ctx:
            loss = _loss(ps, x) / 3
            (loss * float("nan") if poison and i == 2 else loss).backward()


def _reference_grads(ps: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """fp32 CPU grads as the reference update sees them, and torch's norm of the grads."""
    clones = []
    for p in ps:
        c = torch.empty_like(p)
        c.grad = p.grad.clone()
        clones.append(c)
    norm = torch.nn.utils.clip_grad_norm_(clones, MAX_NORM)
    if ps[0].dtype == torch.float32:  # torch's own clipped grads, as the reference has them
        grads = [c.grad.cpu().contiguous() for c in clones]
    else:  # ours scales fp32 copies (no bf16 rounding of the scaled grad)
        coef = torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0).cpu()
        grads = [p.grad.float().cpu().contiguous() * coef for p in ps]
    return grads, norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contract", [True, False])
def test_cuda_steps_equal_fused_cpu_adamw_on_fp32_masters(dtype: torch.dtype,
                                                          contract: bool) -> None:
    ps, base = _params(dtype)
    masters = [torch.nn.Parameter(p.detach().float().cpu().contiguous()) for p in ps]
    opt = CPUOffloadAdamW(_groups(ps), chunk_bytes=16 << 10, **KW)  # pieces of w1 and w2
    ref = torch.optim.AdamW(_groups(masters), fused=True, **KW)
    n_steps = 0
    for step in range(5):
        poison = step == 2  # a skipped step: non-finite norm, zero_grad only
        _backward(ps, opt, step, poison=poison, contract=contract)
        grads, ref_norm = _reference_grads(ps)
        norm = opt.clip_grad_norm_(MAX_NORM)
        assert torch.equal(norm, ref_norm) or (poison and not math.isfinite(float(norm)))
        if math.isfinite(float(norm)):
            opt.step()
            n_steps += 1
            for m, g in zip(masters, grads):
                m.grad = g
            ref.step()
            expected = len(ps) if contract else 0
            assert opt.stats["copies_in_backward"] == expected
            assert opt.stats["copies_at_step"] == len(ps) - expected
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        for p, m in zip(ps, masters):
            assert torch.equal(opt.state[p]["master"], m.detach()), (step, p.shape)
            assert torch.equal(p.detach().cpu(), m.detach().to(dtype)), (step, p.shape)
    assert n_steps == 4 and opt.state[ps[0]]["step"].item() == 4
    # the strided parameter is still a view of base, which got the update
    assert ps[0].data_ptr() == base[:, 3:67].data_ptr()
    assert torch.equal(base[:, 3:67].t().cpu(), masters[0].detach().to(dtype))


def test_grads_changed_after_their_copy_are_copied_again() -> None:
    """torch's clip_grad_norm_ after last_backward scales the device grads in place."""
    ps, _ = _params(torch.float32)
    masters = [torch.nn.Parameter(p.detach().cpu().contiguous()) for p in ps]
    opt = CPUOffloadAdamW(_groups(ps), **KW)
    ref = torch.optim.AdamW(_groups(masters), fused=True, **KW)
    _backward(ps, opt, 0)
    torch.nn.utils.clip_grad_norm_(ps, 1e-3)
    for m, p in zip(masters, ps):
        m.grad = p.grad.cpu().contiguous()
    opt.step()
    ref.step()
    assert opt.stats["copies_at_step"] == len(ps)
    for p, m in zip(ps, masters):
        assert torch.equal(p.detach().cpu(), m.detach())


def test_copies_start_during_backward() -> None:
    """With last_backward, each grad's copy is issued from its hook, before backward returns."""
    ps, _ = _params(torch.bfloat16)
    opt = CPUOffloadAdamW(_groups(ps), **KW)
    seen: list[int] = []
    loss = _loss(ps, torch.randn(32, 64, device="cuda"))
    with opt.last_backward():
        for p in ps:  # runs after ours: how many copies exist when each grad is final
            p.register_post_accumulate_grad_hook(lambda _p: seen.append(len(opt._pending)))
        loss.backward()
        issued_in_backward = len(opt._pending)
    assert issued_in_backward == len(ps)
    assert sorted(seen) == list(range(1, len(ps) + 1))  # one new copy per finished grad
    assert all(c.in_backward for c in opt._pending.values())
    opt.step()
    assert opt.stats["copies_in_backward"] == len(ps) and opt.stats["copies_at_step"] == 0


def test_no_optimizer_state_in_gpu_memory() -> None:
    ps, _ = _params(torch.bfloat16)
    torch.cuda.synchronize()
    weights_only = torch.cuda.memory_allocated()
    opt = CPUOffloadAdamW(_groups(ps), **KW)
    for step in range(3):
        _backward(ps, opt, step)
        opt.clip_grad_norm_(MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == weights_only
    assert opt.state_bytes()["accelerator"] == 0
    for state in opt.state.values():
        for key, value in state.items():
            assert value.device.type == "cpu", key
