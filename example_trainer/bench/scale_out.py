"""What FSDP2 buys per rank: memory of the training state and trained tokens/s, 1 rank vs N.

``python -m example_trainer.bench.scale_out --ranks 2 [--model DIR] [--out scale_out.json]``

Runs the same steps (synthetic GRPO batches, same seed, same global batch) once as a single
process and once under torchrun with ``--ranks`` ranks (FSDP2; gloo on CPU, NCCL on CUDA;
``--ranks 1`` is FSDP2 on a one-rank group, its cost on one GPU against the plain process),
and prints, side by side, what each rank holds of the training state right after an
optimizer step (its shards of the parameters, their gradients and the optimizer state: the
memory sharding divides) and the trained tokens per second of the whole group. On the 2-core
CPU machine two ranks share the cores, so no speed-up is expected there; the memory ratio is
what carries over to GPUs. On CUDA it also reports each rank's peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MIB = 2**20


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds of `tensor` (its shard, for an FSDP2 DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def training_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                         ) -> dict[str, int]:
    """Parameters (with fp32 masters, where a bf16 model has them), gradients and optimizer
    state this rank holds now."""
    params = list(model.parameters())
    masters = sum(optimizer.master_bytes().values()) if hasattr(optimizer, "master_bytes") \
        else 0
    inner = getattr(optimizer, "inner", optimizer)  # MasterWeightsOptimizer's AdamW
    return {"params": sum(local_bytes(p) for p in params) + masters,
            "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local_bytes(v) for state in inner.state.values()
                             for v in state.values()
                             if isinstance(v, torch.Tensor) and v.dim() > 0)}


def synthetic_batch(step: int, size: int, prompt_len: int, completion_len: int, vocab: int,
                    pad_id: int) -> Any:
    """A GRPO batch of `size` sequences (groups of 2, one rewarded), the same on every rank."""
    from ..batch import collate_groups
    rng = random.Random(1000 + step)
    groups = []
    for g in range(size // 2):
        tokens, masks, old = [], [], []
        for _ in range(2):
            n = rng.randint(completion_len // 2, completion_len)
            seq = [rng.randrange(2, vocab) for _ in range(prompt_len + n)]
            tokens.append(seq)
            masks.append([-100] * prompt_len + seq[prompt_len:])
            old.append([1.0] * prompt_len + [-2.0] * n)
        groups.append({"tokens": tokens, "masks": masks, "scores": [1.0, 0.0],
                       "inference_logprobs": old})
    return collate_groups(groups, pad_id=pad_id)


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): train, measure, write this rank's JSON."""
    from ..config import TrainConfig
    from ..distributed import build_sharded_optimizer, init_distributed, shard_model
    from ..model import load_model
    from ..optim import build_optimizer
    from ..step import StepConfig, grpo_step
    cfg = TrainConfig(model=args.model, device=args.device, dtype=args.dtype,
                      optimizer=args.optimizer, lr=1e-6, batch_size=args.batch_size,
                      micro_batch_size=args.micro_batch_size)
    dist = init_distributed(cfg, even_alone=args.sharded)
    torch.manual_seed(0)
    model, tokenizer = load_model(cfg)
    if dist is not None:
        shard_model(model, cfg, dist)
        optimizer = build_sharded_optimizer(cfg, model)
    else:
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    # The rank's device: under CPU offload FSDP2 keeps the shards in CPU memory.
    device = dist.device if dist is not None else next(model.parameters()).device
    peak: dict[str, int] = {}

    def measure(*_: Any) -> None:  # after the update: gradients and state both present
        now = training_state_bytes(model, optimizer)
        if sum(now.values()) > sum(peak.values()):
            peak.update(now)

    optimizer.register_step_post_hook(measure)
    step_cfg = StepConfig.from_config(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens = [], 0
    for step in range(args.steps):
        batch = synthetic_batch(step, args.batch_size, args.prompt_len, args.completion_len,
                                min(len(tokenizer), model.config.vocab_size),
                                tokenizer.pad_token_id).to(device)
        start = time.perf_counter()
        grpo_step(model, optimizer, batch, step_cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        tokens = int(batch.num_tokens)
        if dist is None or dist.is_main:
            log.info("%d rank(s): step %d/%d %.2f s", 1 if dist is None else dist.world_size,
                     step + 1, args.steps, times[-1])
    steady = times[1:] or times  # the first step warms caches up
    result = {"rank": 0 if dist is None else dist.rank,
              "world_size": 1 if dist is None else dist.world_size,
              "state_bytes": peak, "step_s": statistics.median(steady),
              "tokens_per_step": tokens,
              "cuda_peak_bytes": (torch.cuda.max_memory_allocated(device)
                                  if device.type == "cuda" else None)}
    Path(args.worker_out, f"rank{result['rank']}.json").write_text(json.dumps(result))
    if dist is not None:
        dist.close()


def run_world(args: argparse.Namespace, ranks: int, out_dir: Path) -> list[dict[str, Any]]:
    """The worker as one plain process (`ranks` 0) or on `ranks` FSDP2 ranks (torchrun);
    each rank's result."""
    out_dir.mkdir(parents=True, exist_ok=True)
    worker_args = ["-m", "example_trainer.bench.scale_out", "--worker-out", str(out_dir),
                   *args.passthrough]
    if ranks == 0:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(ranks), *worker_args, "--sharded"]
    log.info("training %d step(s) %s", args.steps,
             f"on {ranks} FSDP2 rank(s)" if ranks else "in one plain process")
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(
        max(1, (os.cpu_count() or 1) // max(1, ranks)))}, timeout=args.timeout)
    if done.returncode != 0:
        which = f"{ranks}-rank" if ranks else "one-process"
        raise SystemExit(f"the {which} run failed (exit {done.returncode}); its output is "
                         "above")
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def summarize(results: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per world size (0: the plain process): the largest rank's state, tokens/s; ratios
    against the plain process."""
    rows = {}
    for world, ranks in sorted(results.items()):
        state = max((r["state_bytes"] for r in ranks), key=lambda s: sum(s.values()))
        step_s = max(r["step_s"] for r in ranks)
        rows[world] = {"ranks": world or 1, "fsdp2": world > 0,
                       "state_mib_per_rank": {k: v / MIB for k, v in state.items()},
                       "total_mib_per_rank": sum(state.values()) / MIB,
                       "step_s": step_s, "tokens_per_s": ranks[0]["tokens_per_step"] / step_s,
                       "cuda_peak_mib_per_rank": (max(r["cuda_peak_bytes"] for r in ranks) / MIB
                                                  if ranks[0]["cuda_peak_bytes"] else None)}
    base = rows[min(rows)]
    for row in rows.values():
        row["memory_vs_1"] = row["total_mib_per_rank"] / base["total_mib_per_rank"]
        row["tokens_per_s_vs_1"] = row["tokens_per_s"] / base["tokens_per_s"]
    return {"rows": list(rows.values())}


def table(summary: dict[str, Any]) -> str:
    lines = ["ranks | params | grads | optimizer | state/rank MiB | vs 1 process | step s | "
             "tokens/s | vs 1 process | CUDA peak/rank MiB",
             "---|---|---|---|---|---|---|---|---|---"]
    for r in summary["rows"]:
        s = r["state_mib_per_rank"]
        peak = r["cuda_peak_mib_per_rank"]
        label = f"{r['ranks']} FSDP2" if r["fsdp2"] else "1 process"
        lines.append(f"{label} | {s['params']:.1f} | {s['grads']:.1f} | "
                     f"{s['optimizer']:.1f} | {r['total_mib_per_rank']:.1f} | "
                     f"{r['memory_vs_1']:.2f}x | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_vs_1']:.2f}x | "
                     f"{'-' if peak is None else f'{peak:.0f}'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m example_trainer.bench.scale_out",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="FSDP2 ranks to compare with "
                        "one plain process (1: FSDP2's own cost on one device)")
    parser.add_argument("--model", default="", help="model directory (default: the "
                        "embedded default model)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw_cpu"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds each run may take")
    parser.add_argument("--out", default="", help="write the figures as JSON here")
    parser.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error("--ranks must be at least 1 (FSDP2 ranks, compared with one process)")
    if args.batch_size % 2:
        parser.error("--batch-size must be even (groups of 2)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    from ..config import DEFAULTS
    args.model = args.model or DEFAULTS.model
    args.passthrough = [f for name in ("model", "steps", "batch_size", "micro_batch_size",
                                       "prompt_len", "completion_len", "optimizer", "dtype",
                                       "device")
                        for f in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    with tempfile.TemporaryDirectory() as tmp:
        results = {world: run_world(args, world, Path(tmp) / f"world{world}")
                   for world in (0, args.ranks)}
    summary = summarize(results)
    summary["config"] = {k: v for k, v in vars(args).items() if k != "passthrough"}
    print(table(summary))  # noqa: T201 - the benchmark's report
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
