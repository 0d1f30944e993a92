"""How close ``adamw_cpu`` comes to the hardware floor of a CPU-offloaded AdamW step.

``python -m example_trainer.bench.offload --params 1b --tokens 8192 --out offload.json``

On one model's parameters, in one run, it measures:

* the floor: pinned device-to-host copy of the bf16 gradients, torch's fused CPU AdamW over
  fp32 masters (all cores), host-to-device copy of the bf16 weights, and their sum;
* ``adamw_cpu``: exposed optimizer time (end of the last backward on the GPU to the end of
  the step, clip included) and the whole grpo-like step (forward + backward over
  ``--tokens`` tokens, clip, step), with and without ``last_backward()``;
* ``adamw`` (fused, on the device) and torchao's ``CPUOffloadOptimizer`` the same way.

On a CPU-only machine the device copies are n/a and the rest runs in fp32, so CI can smoke
test it with ``--params tiny``. Imports nothing that imports vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..offload_adamw import CPUOffloadAdamW
from ..optim import build_optimizer

log = logging.getLogger(__name__)

# Llama-shaped configs (tied embeddings): "1b" is Llama-3.2-1B's shape, "135m" SmolLM2's.
SIZES: dict[str, dict[str, int]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}


def build_model(args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype) -> torch.nn.Module:
    """A local HF model (``--model``) or a random-init Llama of ``--params`` size."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        return model.to(device)
    config = LlamaConfig(**SIZES[args.params], max_position_embeddings=max(4096, args.seq_len),
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def _all_threads() -> Iterator[int]:
    before = torch.get_num_threads()
    n = max(before, len(os.sched_getaffinity(0)))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def measure_floor(params: list[torch.Tensor], device: torch.device, repeats: int
                  ) -> dict[str, float | None]:
    """The three unavoidable pieces, each alone, on these parameters' sizes."""
    out: dict[str, float | None] = {"d2h_s": None, "h2d_s": None}
    if device.type == "cuda":
        pinned = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params]

        def d2h() -> None:
            for h, p in zip(pinned, params):
                h.copy_(p.detach(), non_blocking=True)

        def h2d() -> None:
            with torch.no_grad():
                for h, p in zip(pinned, params):
                    p.copy_(h, non_blocking=True)

        d2h()
        out["d2h_s"] = _median_time(d2h, device, repeats)
        out["h2d_s"] = _median_time(h2d, device, repeats)
        del pinned
    masters = [torch.nn.Parameter(p.detach().to("cpu", torch.float32)) for p in params]
    for m in masters:
        m.grad = m.detach() * 1e-3  # values do not change the cost; randn of 1B is slow
    opt = torch.optim.AdamW(masters, lr=1e-5, fused=True)
    with _all_threads() if device.type == "cuda" else contextlib.nullcontext():
        opt.step()  # creates the state
        out["cpu_adamw_s"] = _median_time(opt.step, torch.device("cpu"), repeats)
    out["total_s"] = sum(v for v in out.values() if v is not None)
    del opt, masters
    gc.collect()
    return out


def make_batches(args: argparse.Namespace, vocab: int, device: torch.device
                 ) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    rows = max(1, args.tokens // args.seq_len)
    ids = torch.randint(0, vocab, (rows, args.seq_len), generator=gen)
    return [c.to(device) for c in ids.chunk(min(args.micro_batches, rows))]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
               batches: list[torch.Tensor], max_norm: float, use_contract: bool,
               device: torch.device) -> dict[str, float]:
    """grpo_step's shape: micro-batches, the last in ``last_backward()``, clip, step.

    Returns the whole step's wall time and the exposed optimizer time (from the end of the
    last backward on the device to the end of the step, on the device's clock for CUDA).
    """
    _sync(device)
    t0 = time.perf_counter()
    for i, ids in enumerate(batches):
        last = i == len(batches) - 1
        ctx = (opt.last_backward() if use_contract and last and hasattr(opt, "last_backward")
               else contextlib.nullcontext())
        loss = model(input_ids=ids, labels=ids).loss / len(batches)
        with ctx:
            loss.backward()
    cpu_bwd = time.perf_counter()
    if device.type == "cuda":
        bwd_done = torch.cuda.Event(enable_timing=True)
        bwd_done.record()
    params = [p for g in opt.param_groups for p in g["params"]]
    if use_contract and hasattr(opt, "clip_grad_norm_"):
        norm = float(opt.clip_grad_norm_(max_norm))
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if math.isfinite(norm):
        opt.step()
    if device.type == "cuda":
        step_done = torch.cuda.Event(enable_timing=True)
        step_done.record()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    end = time.perf_counter()
    exposed = (bwd_done.elapsed_time(step_done) / 1e3 if device.type == "cuda"
               else end - cpu_bwd)
    return {"step_s": end - t0, "exposed_s": exposed}


def run_optimizer(name: str, make: Callable[[], torch.optim.Optimizer],
                  model: torch.nn.Module, batches: list[torch.Tensor],
                  args: argparse.Namespace, device: torch.device,
                  use_contract: bool = True) -> dict[str, Any]:
    opt = make()
    for _ in range(args.warmup):
        train_step(model, opt, batches, args.max_grad_norm, use_contract, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [train_step(model, opt, batches, args.max_grad_norm, use_contract, device)
            for _ in range(args.repeats)]
    row: dict[str, Any] = {"name": name,
                           "step_s": statistics.median(r["step_s"] for r in runs),
                           "exposed_s": statistics.median(r["exposed_s"] for r in runs)}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    stats = getattr(opt, "stats", None)
    if isinstance(stats, dict) and stats:
        row["last_step_stats"] = dict(stats)
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    del opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("%s: %s", name, row)
    return row


def _torchao_optimizer() -> Callable[..., torch.optim.Optimizer] | str:
    try:
        import torchao
        from torchao.optim import CPUOffloadOptimizer
    except Exception as exc:  # missing, or built for another torch
        return f"not installed ({type(exc).__name__})"
    log.info("torchao %s", getattr(torchao, "__version__", "?"))
    return CPUOffloadOptimizer


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model = build_model(args, device, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    log.info("%d parameters (%s, %s)", n_params, dtype, device)
    result: dict[str, Any] = {
        "config": {**vars(args), "device": str(device), "dtype": str(dtype),
                   "parameters": n_params},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cores": len(os.sched_getaffinity(0)),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else None},
    }
    result["floor"] = measure_floor(params, device, args.repeats)
    batches = make_batches(args, model.config.vocab_size, device)
    kw = dict(lr=1e-5, weight_decay=0.0)
    rows = [run_optimizer("adamw", lambda: build_optimizer("adamw", params, **kw),
                          model, batches, args, device)]
    for chunk_mib in args.chunk_mib:
        make = (lambda c=chunk_mib: CPUOffloadAdamW(params, chunk_bytes=int(c * 2**20), **kw))
        rows.append(run_optimizer(f"adamw_cpu (chunk {chunk_mib:g} MiB)", make, model,
                                  batches, args, device))
    if device.type == "cuda":
        make = (lambda c=args.chunk_mib[0]:
                CPUOffloadAdamW(params, chunk_bytes=int(c * 2**20), **kw))
        rows.append(run_optimizer("adamw_cpu, no last_backward", make, model, batches, args,
                                  device, use_contract=False))
    ao = _torchao_optimizer()
    if isinstance(ao, str) or device.type != "cuda":
        rows.append({"name": "torchao CPUOffloadOptimizer",
                     "note": ao if isinstance(ao, str) else "n/a (needs CUDA)"})
    else:
        rows.append(run_optimizer(
            "torchao CPUOffloadOptimizer",
            lambda: ao(params, torch.optim.AdamW, **kw), model, batches, args, device))
    result["rows"] = rows
    _ratios(result)
    return result


def _ratios(result: dict[str, Any]) -> None:
    floor = result["floor"]["total_s"]
    by_name = {r["name"]: r for r in result["rows"]}
    adamw = by_name.get("adamw", {}).get("step_s")
    torchao = by_name.get("torchao CPUOffloadOptimizer", {}).get("step_s")
    for row in result["rows"]:
        if "step_s" not in row:
            continue
        row["exposed_vs_floor"] = row["exposed_s"] / floor if floor else None
        row["step_vs_adamw"] = row["step_s"] / adamw if adamw else None
        row["step_vs_torchao"] = row["step_s"] / torchao if torchao else None


def format_table(result: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    fl = result["floor"]
    lines = [f"parameters {result['config']['parameters']:,} ({result['config']['dtype']}, "
             f"{result['config']['device']}), tokens {result['config']['tokens']}, "
             f"{result['machine']['cores']} cores",
             f"floor: D2H grads {f(fl['d2h_s'])} s + fused CPU AdamW {f(fl['cpu_adamw_s'])} s"
             f" + H2D weights {f(fl['h2d_s'])} s = {f(fl['total_s'])} s",
             f"{'optimizer':<34}{'step s':>9}{'exposed s':>11}{'exp/floor':>11}"
             f"{'vs adamw':>10}{'vs torchao':>12}"]
    for row in result["rows"]:
        if "step_s" not in row:
            lines.append(f"{row['name']:<34}{row.get('note', '')}")
            continue
        lines.append(f"{row['name']:<34}{f(row['step_s']):>9}{f(row['exposed_s']):>11}"
                     f"{f(row['exposed_vs_floor'], '.2f'):>11}"
                     f"{f(row['step_vs_adamw'], '.2f'):>10}"
                     f"{f(row['step_vs_torchao'], '.2f'):>12}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m example_trainer.bench.offload",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="a local Hugging Face model directory")
    ap.add_argument("--params", default="1b", choices=sorted(SIZES),
                    help="synthetic Llama size when --model is not given (random init)")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--device", default="", help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", default="", choices=["", "bf16", "fp32"],
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--chunk-mib", type=float, nargs="+", default=[32.0],
                    help="adamw_cpu chunk sizes to measure (one row each)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))  # the report itself
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        log.info("JSON written to %s", path)
    return result


if __name__ == "__main__":
    main()
