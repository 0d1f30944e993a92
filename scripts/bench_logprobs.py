"""Benchmark: chunked `sampled_token_logprobs` vs naive full-logits log-probs.

Times forward + backward of a policy-loss step on a random Llama-style model with a large
vocabulary (49152, like SmolLM2), where the [B, T, V] logits dominate memory, and measures
peak memory of each variant:

- time: both variants in this process, interleaved, after one warm-up step each;
- memory on CPU: each variant in a fresh subprocess; after a first step, the kernel's RSS
  high-water mark is reset and a second step measured (peak RSS, and peak minus the RSS
  just before the step); on CUDA: torch.cuda.max_memory_allocated in-process.

    python scripts/bench_logprobs.py --vocab 49152 --hidden 256 --batch 4 --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from example_trainer.logprobs import naive_token_logprobs, sampled_token_logprobs  # noqa: E402
from example_trainer.loss import policy_loss  # noqa: E402

VARIANTS = ("chunked", "naive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--chunk-size", type=int, default=1024, help="positions per lm_head chunk")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_memory-worker", dest="memory_worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """Random tied-embedding Llama model and a batch (ids, attention mask, temps, loss inputs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64 or 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=True,
    )
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(cfg).to(device=args.device, dtype=dtype).train()
    B, T = args.batch, args.seq
    ids = torch.randint(0, args.vocab, (B, T), device=args.device)
    attn = torch.ones_like(ids)
    temps = torch.full((B,), 0.9, device=args.device)
    mask = torch.zeros(B, T - 1, device=args.device)
    mask[:, T // 4 :] = 1.0  # first quarter is "prompt"
    adv = torch.randn(B, device=args.device)
    return model, (ids, attn, temps, mask, adv)


def step(model, batch, variant: str, chunk_size: int) -> None:
    ids, attn, temps, mask, adv = batch
    if variant == "chunked":
        lp = sampled_token_logprobs(model, ids, attn, temps, chunk_size=chunk_size)
    else:
        lp = naive_token_logprobs(model, ids, attn, temps)
    old = lp.detach() + 0.01 * torch.randn_like(lp)
    loss, _ = policy_loss(lp, old, adv, mask)
    loss.backward()
    model.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Reset the kernel's RSS high-water mark (Linux clear_refs 5); return the current RSS.

    Model building peaks above a small model's training step, so a plain ru_maxrss would
    only show the build. Falls back to ru_maxrss where /proc is unavailable.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS") or 0.0
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_worker(args: argparse.Namespace) -> None:
    """Run one variant in this fresh process; print its peak RSS and the RSS before it."""
    model, batch = build(args)
    step(model, batch, args.memory_worker, args.chunk_size)  # first-step allocations
    base = reset_peak_rss()
    step(model, batch, args.memory_worker, args.chunk_size)
    print(json.dumps({"base_mib": base, "peak_mib": peak_rss_mib()}))


def peak_memory_mib(args: argparse.Namespace, model, batch, variant: str) -> tuple[float, float]:
    """(peak during a step, resident before it) in MiB for one variant."""
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        step(model, batch, variant, args.chunk_size)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, base
    argv = [sys.executable, __file__, *args.argv, "--_memory-worker", variant]
    # A fixed glibc mmap threshold returns freed large tensors to the OS, so RSS tracks live
    # memory instead of the allocator's retained heap (its dynamic threshold grows to 32 MiB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
    res = json.loads(out.strip().splitlines()[-1])
    return res["peak_mib"], res["base_mib"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.memory_worker:
        memory_worker(args)
        return
    model, batch = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.seq
    print(
        f"model: vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, "
        f"{n_params / 1e6:.1f}M params, {args.dtype}; batch {args.batch} x {args.seq}; "
        f"chunk {args.chunk_size}; device {args.device}, threads {torch.get_num_threads()}"
    )

    for v in VARIANTS:  # warm-up
        step(model, batch, v, args.chunk_size)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:  # interleaved so drift hits both alike
            sync(args.device)
            t0 = time.perf_counter()
            step(model, batch, v, args.chunk_size)
            sync(args.device)
            times[v].append(time.perf_counter() - t0)

    mem = {v: peak_memory_mib(args, model, batch, v) for v in VARIANTS}
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    what = "peak RSS" if not args.device.startswith("cuda") else "peak alloc"
    print(f"\n{'variant':<9} {'step s (median)':>16} {'tokens/s':>10} {what + ' MiB':>15} {'step delta MiB':>15}")
    for v in VARIANTS:
        peak, base = mem[v]
        print(f"{v:<9} {med[v]:>16.3f} {tokens / med[v]:>10.0f} {peak:>15.0f} {peak - base:>15.0f}")
    c, n = "chunked", "naive"
    print(
        f"{'ratio c/n':<9} {med[c] / med[n]:>16.2f} {med[n] / med[c]:>10.2f} "
        f"{mem[c][0] / mem[n][0]:>15.2f} {(mem[c][0] - mem[c][1]) / max(mem[n][0] - mem[n][1], 1e-9):>15.2f}"
    )
    print("(step times, s: " + "; ".join(f"{v} " + ", ".join(f"{t:.3f}" for t in times[v]) for v in VARIANTS) + ")")


if __name__ == "__main__":
    main()
