"""`--optimizer adamw_8bit` on CUDA, where bitsandbytes has its real kernels (CI has no GPU
and only tests the CPU path, if the installed bitsandbytes has one).

The reference check follows bitsandbytes' own test of its 8-bit blockwise Adam
(tests/test_optim.py): parameters ~N(0, 0.1), gradients ~N(0, 0.01), default lr; after each
step torch's AdamW state is set to bitsandbytes' dequantised state (so only the update rule
is compared, not the quantisation error that builds up), and the parameters must agree to
isclose(atol=1e-5, rtol=1e-3) with at most 5 misses, the states (before that copy) to
isclose(atol=3e-3, rtol=1e-3) with fewer than 20. Run with `-m gpu`; skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from example_trainer.optim import build_optimizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 4
BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer state


def dequantized_moments(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' (exp_avg, exp_avg_sq) of one parameter as fp32 tensors."""
    if state["state1"].dtype != torch.uint8:  # under min_8bit_size: plain 32-bit state
        return state["state1"], state["state2"]
    from bitsandbytes.functional import dequantize_blockwise
    return tuple(dequantize_blockwise(state[f"state{i}"], absmax=state[f"absmax{i}"],
                                      code=state[f"qmap{i}"], blocksize=BLOCKSIZE)
                 for i in (1, 2))


def close_but_for(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> int:
    return int((~torch.isclose(a, b, atol=atol, rtol=rtol)).sum())


@torch.no_grad()
def test_adamw_8bit_steps_match_torch_adamw_within_bitsandbytes_tolerance():
    gen = torch.Generator(device="cuda").manual_seed(0)
    # 65536 values: 8-bit blockwise state; 256 values: under bitsandbytes' min_8bit_size
    # (4096), so that one keeps 32-bit state.
    start = [torch.randn(1024, 64, device="cuda", generator=gen) * 0.1,
             torch.randn(256, device="cuda", generator=gen) * 0.1]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    optimizer = build_optimizer("adamw_8bit", ours, lr=1e-3)
    reference = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.0)
    for step in range(1, STEPS + 1):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 0.01
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
        for p, q in zip(ours, ref):
            where = f"step {step}, shape {tuple(p.shape)}"
            misses = close_but_for(p, q, atol=1e-5, rtol=1e-3)
            assert misses <= 5, f"{where}: {misses} parameters off"
            exp_avg, exp_avg_sq = dequantized_moments(optimizer.state[p])
            for ours_m, name in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
                misses = close_but_for(ours_m, reference.state[q][name], atol=3e-3, rtol=1e-3)
                assert misses < 20, f"{where}: {misses} values of {name} off"
            reference.state[q]["exp_avg"].copy_(exp_avg)
            reference.state[q]["exp_avg_sq"].copy_(exp_avg_sq)
    assert not torch.equal(ours[0], start[0])
    assert optimizer.state[ours[0]]["state1"].dtype == torch.uint8
    assert optimizer.state[ours[0]]["state1"].is_cuda
    assert optimizer.state[ours[1]]["state1"].dtype == torch.float32


def test_adamw_8bit_updates_a_row_block_view_in_place():
    """shared_vllm's parameters are row blocks of vLLM's fused tensors: the 8-bit step must
    write through the view, not swap in a copy (bitsandbytes does for non-contiguous data)."""
    fused = torch.randn(3 * 128, 64, device="cuda") * 0.1
    before = fused.clone()
    rows = torch.nn.Parameter(fused[128:256])  # the "k" block: a contiguous view
    pointer = rows.data_ptr()
    optimizer = build_optimizer("adamw_8bit", [rows], lr=1e-2)
    rows.grad = torch.ones_like(rows)
    optimizer.step()
    torch.cuda.synchronize()
    assert rows.data_ptr() == pointer
    assert torch.equal(fused[128:256], rows.detach())
    assert not torch.equal(fused[128:256], before[128:256])
    assert torch.equal(fused[:128], before[:128]) and torch.equal(fused[256:], before[256:])


def test_adamw_8bit_steps_bf16_parameters():
    """Training on GPU runs in bf16 (vLLM serves bf16; `build_optimizer` adds fp32 master
    weights): the step must move the tensor and stay finite, along the fp32 AdamW update
    (sign agreement, not values)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    start = torch.randn(1024, 64, device="cuda", generator=gen) * 0.1
    p = torch.nn.Parameter(start.to(torch.bfloat16))
    q = torch.nn.Parameter(p.detach().float().clone())
    optimizer = build_optimizer("adamw_8bit", [p], lr=1e-2)
    reference = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0)
    grad = torch.randn(p.shape, device="cuda", generator=gen) * 0.01
    p.grad, q.grad = grad.to(torch.bfloat16), grad.clone()
    optimizer.step()
    reference.step()
    ours = p.detach().float() - start.to(torch.bfloat16).float()
    theirs = q.detach() - start.to(torch.bfloat16).float()
    assert torch.isfinite(p).all() and ours.abs().sum() > 0
    agree = float((torch.sign(ours) == torch.sign(theirs)).float().mean())
    assert agree > 0.9, f"only {agree:.1%} of the bf16 updates point the fp32 way"
