"""CPUOffloadAdamW on CPU: bit-exact against torch.optim.AdamW, the grpo_step contract
(last_backward / clip_grad_norm_ over micro-batches, skipped steps), checkpoints."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch

from example_trainer.offload_adamw import CPUOffloadAdamW
from example_trainer.optim import build_optimizer

KW = dict(betas=(0.8, 0.95), eps=1e-6)


def _groups(params: list[torch.Tensor]) -> list[dict]:
    """Two groups with different lr and weight decay (the second without decay)."""
    return [{"params": params[:-1], "lr": 0.05, "weight_decay": 0.1},
            {"params": params[-1:], "lr": 0.02, "weight_decay": 0.0}]


class Net(torch.nn.Module):
    """Two linears and a bias; ``view`` makes the first weight a transposed slice."""

    def __init__(self, dtype: torch.dtype = torch.float32, view: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.base = torch.randn(6, 10, generator=gen)
        w1 = self.base[:, 2:7].t() if view else self.base[:, 2:7].t().contiguous()
        self.w1 = torch.nn.Parameter(w1.to(dtype) if dtype != torch.float32 else w1)
        self.w2 = torch.nn.Parameter(torch.randn(8, 5, generator=gen).to(dtype))
        # 300 elements: more than one 64-element piece, with a tail (chunk_bytes=256)
        self.w3 = torch.nn.Parameter(torch.randn(30, 10, generator=gen).to(dtype))
        self.b = torch.nn.Parameter(torch.linspace(-1, 1, 8).to(dtype))

    def params(self) -> list[torch.nn.Parameter]:
        return [self.w1, self.w2, self.w3, self.b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x.to(self.w1.dtype) @ self.w1.t())
        h = h @ self.w2.t() + self.b
        return ((h.float() ** 2).mean() + self.w1.float().sum() * 0.1
                + torch.tanh(self.w3.float() * h.float().mean()).sum() * 0.01)


def _inputs(n: int = 3, seed: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=gen) for _ in range(n)]


def _micro_step(net: Net, opt: torch.optim.Optimizer, xs: list[torch.Tensor],
                max_norm: float) -> float:
    """grpo_step's side of the contract: last micro-batch in last_backward, clip, step."""
    for i, x in enumerate(xs):
        last = i == len(xs) - 1
        ctx = opt.last_backward() if last and hasattr(opt, "last_backward") \
            else contextlib.nullcontext()
        with ctx:
            (net(x) / len(xs)).backward()
    if hasattr(opt, "clip_grad_norm_"):
        norm = float(opt.clip_grad_norm_(max_norm))
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(net.params(), max_norm))
    if math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def test_fp32_cpu_params_equal_torch_foreach_in_place_views_included() -> None:
    ours, ref = Net(view=True), Net(view=True)
    assert not ours.w1.is_contiguous() and ours.w1.data_ptr() == ours.base[:, 2:7].data_ptr()
    opt = CPUOffloadAdamW(_groups(ours.params()), **KW)
    ref_opt = torch.optim.AdamW(_groups(ref.params()), foreach=True, **KW)
    base_before = ours.base.clone()
    for step in range(6):
        for net, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            net(_inputs(1, seed=step)[0]).backward()
            o.step()
        for a, b in zip(ours.params(), ref.params()):
            assert torch.equal(a.detach(), b.detach()), step
    # the update landed in the shared base memory and nothing else of it moved
    assert ours.w1.data_ptr() == ours.base[:, 2:7].data_ptr()
    assert not torch.equal(ours.base[:, 2:7], base_before[:, 2:7])
    assert torch.equal(ours.base[:, :2], base_before[:, :2])
    assert torch.equal(ours.base[:, 7:], base_before[:, 7:])
    assert all("master" not in opt.state[p] for p in ours.params())


def _master_reference(net: Net) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW]:
    masters = [torch.nn.Parameter(p.detach().float().contiguous()) for p in net.params()]
    return masters, torch.optim.AdamW(_groups(masters), fused=True, **KW)


@pytest.mark.parametrize("chunk_bytes", [256, 1 << 20])  # 64 floats: pieces of params
def test_bf16_params_masters_equal_torch_fused_on_fp32(chunk_bytes: int) -> None:
    net = Net(torch.bfloat16, view=True)
    opt = CPUOffloadAdamW(_groups(net.params()), chunk_bytes=chunk_bytes, **KW)
    masters, ref = _master_reference(net)
    for step in range(5):
        opt.zero_grad()
        net(_inputs(1, seed=step)[0]).backward()
        for m, p in zip(masters, net.params()):
            m.grad = p.grad.float().contiguous()  # fused CPU AdamW misreads strided grads
        opt.step()
        ref.step()
        for m, p in zip(masters, net.params()):
            assert torch.equal(opt.state[p]["master"], m.detach()), step
            assert torch.equal(p.detach(), m.detach().to(torch.bfloat16)), step
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[m]["exp_avg_sq"])
    assert opt.state[net.w1]["step"].item() == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_micro_batches_last_backward_clip_equal_torch_clip_grad_norm(
        dtype: torch.dtype) -> None:
    """3 micro-batches, the last inside last_backward, clip, step == torch's clip + AdamW."""
    ours, ref_net = Net(dtype, view=True), Net(dtype, view=True)
    opt = CPUOffloadAdamW(_groups(ours.params()), chunk_bytes=256, **KW)
    if dtype == torch.float32:
        ref_opt: torch.optim.Optimizer = torch.optim.AdamW(_groups(ref_net.params()),
                                                           foreach=True, **KW)
    else:
        masters, ref_opt = _master_reference(ref_net)
    clipped = 0
    for step in range(4):
        xs = _inputs(3, seed=10 + step)
        norm = _micro_step(ours, opt, xs, max_norm=0.5)
        for x in xs:
            (ref_net(x) / len(xs)).backward()
        raw = [p.grad.float().contiguous() for p in ref_net.params()]
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_net.params(), 0.5)
        assert norm == float(ref_norm), step
        clipped += norm > 0.5
        if dtype == torch.float32:
            ref_opt.step()
            for a, b in zip(ours.params(), ref_net.params()):
                assert torch.equal(a.detach(), b.detach()), step
        else:
            # torch's clip would round the scaled bf16 grads; ours scales the fp32 copies,
            # so the reference masters get fp32 grads times torch's coefficient.
            coef = torch.clamp(0.5 / (ref_norm + 1e-6), max=1.0)
            for m, g in zip(masters, raw):
                m.grad = g * coef
            ref_opt.step()
            for m, p, q in zip(masters, ours.params(), ref_net.params()):
                assert torch.equal(opt.state[p]["master"], m.detach()), step
                assert torch.equal(p.detach(), m.detach().to(torch.bfloat16)), step
                with torch.no_grad():
                    q.copy_(m)
        ref_opt.zero_grad()
        ref_net.zero_grad()
    assert clipped >= 2  # the clip really scaled the gradients


def test_skipped_step_discards_everything_and_next_step_is_exact() -> None:
    net = Net(torch.bfloat16)
    opt = CPUOffloadAdamW(_groups(net.params()), **KW)
    masters, ref = _master_reference(net)
    xs = _inputs(3, seed=20)
    _micro_step(net, opt, xs, max_norm=1.0)
    for m, p in zip(masters, net.params()):
        m.grad = None
    # A poisoned step: non-finite norm, so the caller skips step() and only zero_grads.
    before = {k: copy.deepcopy(v) for k, v in opt.state_dict()["state"].items()}
    with opt.last_backward():
        (net(xs[0]) * float("nan")).backward()
    assert not math.isfinite(float(opt.clip_grad_norm_(1.0)))
    opt.zero_grad(set_to_none=True)
    assert opt._clip_coef is None and not opt._pending
    after = opt.state_dict()["state"]
    for k in before:
        for key, value in before[k].items():
            assert torch.equal(value, after[k][key]), key
    assert opt.state[net.w1]["step"].item() == 1
    # the next step equals a reference that never saw the poisoned step
    ref_masters = [opt.state[p]["master"].clone() for p in net.params()]
    ref_state = copy.deepcopy(opt.state_dict())
    norm = _micro_step(net, opt, [xs[1]], max_norm=1e9)
    twin = Net(torch.bfloat16)
    twin_opt = CPUOffloadAdamW(_groups(twin.params()), **KW)
    twin_opt.load_state_dict(ref_state)
    with torch.no_grad():
        for p, m in zip(twin.params(), ref_masters):
            p.copy_(m)
    assert math.isfinite(_micro_step(twin, twin_opt, [xs[1]], max_norm=1e9)) and norm > 0
    for p, q in zip(net.params(), twin.params()):
        assert torch.equal(opt.state[p]["master"], twin_opt.state[q]["master"])


def test_state_dict_round_trip_resumes_exactly_with_masters() -> None:
    net = Net(torch.bfloat16)
    opt = CPUOffloadAdamW(_groups(net.params()), chunk_bytes=256, **KW)
    for step in range(3):
        _micro_step(net, opt, _inputs(2, seed=30 + step), max_norm=0.5)
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"step", "master", "exp_avg", "exp_avg_sq"}
    net2 = copy.deepcopy(net)
    opt2 = build_optimizer("adamw_cpu", _groups(net2.params()), lr=0.1, **KW)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == 0.05  # the groups' settings came back too
    for step in range(3):
        xs = _inputs(2, seed=40 + step)
        _micro_step(net, opt, xs, max_norm=0.5)
        _micro_step(net2, opt2, xs, max_norm=0.5)
    for p, q in zip(net.params(), net2.params()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master"], opt2.state[q]["master"])
        assert opt2.state[q]["exp_avg"].dtype == torch.float32


def test_hooks_follow_the_optimizer_lifetime() -> None:
    net = Net(torch.bfloat16)
    opt = CPUOffloadAdamW(net.params())
    assert len(opt._hook_handles) == 4
    opt.remove_hooks()
    assert not opt._hook_handles
    opt = CPUOffloadAdamW(net.params())
    del opt  # the hook holds it weakly: a dropped optimizer is freed, backward still works
    net(_inputs(1)[0]).backward()
    assert net.w1.grad is not None


def test_offload_benchmark_smoke_on_cpu(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from example_trainer.bench.offload import main
    out = tmp_path / "offload.json"
    result = main(["--params", "tiny", "--device", "cpu", "--tokens", "64", "--seq-len", "32",
                   "--warmup", "0", "--repeats", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["floor"]["d2h_s"] is None and saved["floor"]["h2d_s"] is None  # GPU-only
    assert saved["floor"]["cpu_adamw_s"] > 0
    rows = {r["name"]: r for r in saved["rows"]}
    assert rows["adamw_cpu (chunk 32 MiB)"]["exposed_s"] > 0
    assert rows["adamw"]["step_vs_adamw"] == 1.0
    assert "step_s" not in rows["torchao CPUOffloadOptimizer"]
    assert result["config"]["parameters"] == saved["config"]["parameters"] > 0
    table = capsys.readouterr().out
    assert "floor: D2H grads n/a" in table and "adamw_cpu (chunk 32 MiB)" in table
