"""fp32 master weights on CUDA, where `--dtype auto` trains in bfloat16 (CI has no GPU; the
same checks run on CPU in test_master_weights.py).

A bf16 run with masters and an fp32 run get identical gradients from the same start; the
masters must move as the fp32 weights do (within 1% relative L1 of the displacement), the
model must hold the masters rounded to bf16, and without masters the bf16 weights must move
far less (the failure this fixes, and the proof the first check can fail). Imports nothing
that imports vllm. Run with `-m gpu`; skipped without CUDA. Measured on an H200 (torch
2.11, bitsandbytes 0.50.2): identical gradients, masters vs fp32 0 for both optimizers,
without masters 0.015 of the fp32 displacement; bf16 forward 0.0039 (adamw), 0.015
(adamw_8bit), without masters 0.99.
"""

from __future__ import annotations

import pytest
import torch

from example_trainer.master_weights import MasterWeightsOptimizer
from example_trainer.optim import build_optimizer, optimizer_state_bytes

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16 = torch.bfloat16
LR = 1e-6
STEPS = 20
OPTIMIZERS = ["adamw", "adamw_8bit"]


def _optimizer_available(name: str) -> None:
    if name == "adamw_8bit":
        pytest.importorskip("bitsandbytes")


def _model(dtype: torch.dtype) -> torch.nn.Sequential:
    """Weights ~0.02 (as in a trained LM), rounded to bf16 so every dtype starts equal;
    65536 and 16384 weights: bitsandbytes' 8-bit blockwise state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
            p.copy_(p.to(BF16))
    return model.to(device="cuda", dtype=dtype)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [(torch.randn(64, 256, device="cuda", generator=gen),
             torch.randn(64, 64, device="cuda", generator=gen)) for _ in range(n)]


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x.to(model[0].weight.dtype)).float(), y)


def _fixed_grads() -> list[list[torch.Tensor]]:
    model = _model(torch.float32)
    out = []
    for x, y in _batches(STEPS):
        model.zero_grad()
        _loss(model, x, y).backward()
        out.append([p.grad.to(BF16) for p in model.parameters()])
    return out


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def _run(name: str, dtype: torch.dtype, master_weights: bool | None, grads=None
         ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor]:
    """Train 20 steps (given gradients, or real ones); returns the masters' displacement."""
    start = _flat(_model(torch.float32).parameters())
    model = _model(dtype)
    opt = build_optimizer(name, model.parameters(), lr=LR, master_weights=master_weights)
    for i, (x, y) in enumerate(_batches(STEPS)):
        opt.zero_grad()
        if grads is None:
            _loss(model, x, y).backward()
        else:
            for p, g in zip(model.parameters(), grads[i]):
                p.grad = g.to(p.dtype)
        opt.step()
    torch.cuda.synchronize()
    masters = (opt.master(p) if isinstance(opt, MasterWeightsOptimizer) else p
               for p in model.parameters())
    return model, opt, _flat(masters) - start


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().sum() / b.abs().sum())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cuda_bf16_masters_move_like_fp32(name: str) -> None:
    _optimizer_available(name)
    grads = _fixed_grads()
    _, _, want = _run(name, torch.float32, None, grads)
    model, opt, got = _run(name, BF16, None, grads)
    assert isinstance(opt, MasterWeightsOptimizer)
    rel = _rel_l1(got, want)
    print(f"{name}: masters vs fp32, identical grads: rel L1 {rel:.3g}")
    assert rel <= 0.01, rel
    n = 0
    for p in model.parameters():
        m = opt.master(p)
        assert m.dtype == torch.float32 and m.device == p.device and p.dtype == BF16
        assert torch.equal(p.detach(), m.to(BF16))
        n += p.numel()
    state = optimizer_state_bytes(opt)
    assert state["cpu"] == 0 and state["accelerator"] >= 4 * n  # masters live on the GPU

    _, _, lost = _run(name, BF16, False, grads)
    ratio = float(lost.abs().sum() / want.abs().sum())
    print(f"{name}: bf16 without masters moved {ratio:.3g} of the fp32 displacement")
    assert ratio < 0.5, ratio


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cuda_end_to_end_bf16_forward(name: str) -> None:
    _optimizer_available(name)
    _, _, want = _run(name, torch.float32, None)
    _, _, got = _run(name, BF16, None)
    _, _, lost = _run(name, BF16, False)
    rel, rel_lost = _rel_l1(got, want), _rel_l1(lost, want)
    print(f"{name}: bf16 forward, masters vs fp32: rel L1 {rel:.3g} (no masters {rel_lost:.3g})")
    assert rel <= 0.03 and rel_lost > 0.5, (rel, rel_lost)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cuda_view_parameter_stays_a_view(name: str) -> None:
    """shared_vllm on GPU: parameters are slices of vLLM's CUDA tensors (CUDA IPC)."""
    _optimizer_available(name)
    torch.manual_seed(0)
    base = (torch.randn(256, 320, device="cuda") * 0.02).to(BF16)
    base0 = base.clone()
    view = torch.nn.Parameter(base[:, 32:288].t())
    ptr = view.data_ptr()
    opt = build_optimizer(name, [view], lr=1e-2)
    for _ in range(3):
        view.grad = torch.randn(view.shape, device="cuda").to(BF16)
        opt.step()
    torch.cuda.synchronize()
    assert view.data_ptr() == ptr and not view.is_contiguous()
    assert torch.equal(base[:, 32:288].t(), view.detach())
    assert torch.equal(view.detach(), opt.master(view).to(BF16))
    assert not torch.equal(base[:, 32:288], base0[:, 32:288])
    assert torch.equal(base[:, :32], base0[:, :32]) and torch.equal(base[:, 288:],
                                                                     base0[:, 288:])
