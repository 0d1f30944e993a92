"""The LoRA sync paths side by side in one run: same server, same adapter bytes, same rounds.

One vLLM server (runtime LoRA, the `LoRAReceiver` worker extension, two adapter slots) and
one peft model. Every round nudges the adapter (a real new version) and puts it into vLLM
along each path, interleaved so machine noise hits all of them alike:

- `bare broadcast`: the adapter's buckets over the weight-sync group and nothing else (no
  rpc, no install): the floor any sync over that group can reach;
- `lora_nccl none|wait`: what the mode's sync does after its first (announce in the group's
  store, broadcast, barrier, prefix-cache reset; the workers install at their next engine
  step), without pausing generation or inside `/pause?mode=wait` + `/resume`;
- `lora_hotswap none|wait`: `save_pretrained` to a new directory, unload + load over HTTP.

Then generation: the same prompts through the adapter as `lora_nccl` installed it and as
`lora_hotswap` loaded it (the hot-swap must not slow generation down, e.g. through vLLM
0.32's sticky `load_inplace`). Prints a table with ratios, where a `lora_nccl` sync's time
goes (medians of the sync's own figures), what its install cost at the engine step, and
writes JSON. `--busy` keeps vLLM generating through the `lora_nccl` adapter meanwhile (the
busy-server figures; every sync is then installed by the next engine step).

    python -m example_trainer.bench.lora_sync                # embedded SmolLM2, r=8
    python -m example_trainer.bench.lora_sync --model DIR --rounds 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..recorder import machine_info
from ..checkpoint import save_weights
from ..config import DEFAULTS, TrainConfig
from ..model import load_model, resolve_model_path
from ..trainer import pin_trainer_cores, remove_dir, start_vllm, vllm_lora_options
from ..vllm.client import VLLMClient
from ..vllm.server import free_port
from ..weight_sync import EXTENSION, AdapterBroadcaster

log = logging.getLogger("example_trainer.bench.lora_sync")

NCCL_NAME, HOTSWAP_NAME = "policy", "hotswap"
# Where a streamed lora_nccl sync's time goes (AdapterBroadcaster.sync's figures). The
# install is not in it: the worker does it at its next engine step (the install figures a
# sync reports are the previous sync's, and stay the first rpc's while nothing generates).
BREAKDOWN = [("pack", "sync/pack_s"), ("announce + barrier", "sync/barrier_s"),
             ("broadcast", "sync/broadcast_s"), ("reset's wait after it", "sync/reset_s"),
             ("receiving in the worker (the sync before)", "sync/receive_s")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULTS.model, help="model directory (default: "
                   "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20, help="timed syncs per path")
    p.add_argument("--gen-prompts", type=int, default=8, help="prompts per generation round")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--gen-rounds", type=int, default=6, help="generation rounds per adapter")
    p.add_argument("--busy", action="store_true", help="keep vLLM generating through the "
                   "lora_nccl adapter during the timed rounds")
    p.add_argument("--port", type=int, default=0, help="vLLM port (default: a free one)")
    p.add_argument("--work-dir", default="", help="where adapters and vLLM's log go "
                   "(default: a temporary directory)")
    p.add_argument("--json", default="", help="write every measurement here")
    return p.parse_args(argv)


def nudge(model: torch.nn.Module, generator: torch.Generator) -> None:
    """A new adapter version: small random steps on every LoRA tensor (lora_B starts at 0,
    so without this the adapter would be the base model)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def keep_generating(client: VLLMClient, adapter: str, prompts: list[list[int]],
                    busy: threading.Event) -> None:
    """Short generations through `adapter`, one after another, while `busy` is set."""
    while busy.is_set():
        client.completions(prompts, n=1, max_tokens=16, temperature=1.0, model=adapter,
                           logprobs=False, ignore_eos=True)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def generation_tokens_per_s(client: VLLMClient, adapter: str, prompts: list[list[int]],
                            tokens: int) -> float:
    start = time.perf_counter()
    out = client.completions(prompts, n=1, max_tokens=tokens, temperature=1.0, seed=0,
                             model=adapter, logprobs=False, ignore_eos=True)
    return sum(len(c.token_ids) for c in out) / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora-sync-bench-"))
    cfg = TrainConfig(mode="lora_nccl", trains="lora", model=args.model, lora_rank=args.lora_rank,
                      dtype="float32",
                      save_path=str(work), vllm_port=args.port or free_port(),
                      max_token_len=512, vllm_extra_args=["--max-loras", "3", "--max-cpu-loras", "3"])
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg)
    generator = torch.Generator().manual_seed(0)
    nudge(model, generator)
    if not torch.cuda.is_available():
        pin_trainer_cores({0})  # vLLM's worker binds to core 0
    server = start_vllm(cfg, resolve_model_path(cfg.model), **vllm_lora_options(cfg),
                        worker_extension_cls=EXTENSION)
    sender = None
    try:
        client = server.client()
        sender = AdapterBroadcaster(client, model, NCCL_NAME, backend=cfg.lora_sync_backend)
        sender.join()
        version = 0
        first = save_weights(work / f"adapter-{version}", model, None)
        client.load_lora_adapter(NCCL_NAME, str(first))
        client.load_lora_adapter(HOTSWAP_NAME, str(first))
        sender.sync()
        adapter_bytes = sum(b.numel() * b.element_size() for b in sender.buckets)

        figures: dict[str, list[dict[str, float]]] = {"none": [], "wait": []}

        def nccl(pause: str) -> None:
            with client.paused(pause):
                figures[pause].append(sender.sync(preempt_running=pause == "none"))

        def hotswap(pause: str) -> None:
            nonlocal version
            version += 1
            path = save_weights(work / f"adapter-{version}", model, None)
            with client.paused(pause):
                client.unload_lora_adapter(HOTSWAP_NAME)
                client.load_lora_adapter(HOTSWAP_NAME, str(path))
            remove_dir(work / f"adapter-{version - 1}")  # as the mode does

        paths: dict[str, Callable[[], None]] = {
            "bare broadcast": lambda: None,  # measured in bulk below, same rounds
            "lora_nccl none": lambda: nccl("none"),
            "lora_nccl wait": lambda: nccl("wait"),
            "lora_hotswap none": lambda: hotswap("none"),
            "lora_hotswap wait": lambda: hotswap("wait"),
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        prompts = [tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a story about the number {i}."}],
            add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(args.gen_prompts)]
        busy = threading.Event()
        installs: list[dict[str, Any]] = []
        if args.busy:  # the lora_nccl adapter in use all along: every sync gets installed
            busy.set()
            load = threading.Thread(target=keep_generating, daemon=True,
                                    args=(client, NCCL_NAME, prompts, busy))
            load.start()
        log.info("timing %d rounds of every path (adapter %.1f MB, %d tensors)%s", args.rounds,
                 adapter_bytes / 1e6, len(sender.params), ", vLLM busy" if args.busy else "")
        for _ in range(args.rounds + 1):  # the first round warms up every path
            nudge(model, generator)
            times["bare broadcast"].append(statistics.median(sender.time_bare_broadcast(3)))
            for name, fn in list(paths.items())[1:]:
                times[name].append(timed(fn))
        if args.busy:
            busy.clear()
            load.join()
        times = {name: values[1:] for name, values in times.items()}
        figures = {pause: values[1:] for pause, values in figures.items()}

        # Both adapters now hold the same weights: generation speed differs only by path.
        nudge(model, generator)
        nccl("wait")
        hotswap("wait")
        generation: dict[str, list[float]] = {"lora_nccl": [], "lora_hotswap": []}
        order = [("lora_nccl", NCCL_NAME), ("lora_hotswap", HOTSWAP_NAME)]
        for _ in range(args.gen_rounds + 1):
            order.reverse()  # neither path always runs first
            for path, adapter in order:
                generation[path].append(generation_tokens_per_s(client, adapter, prompts,
                                                                args.gen_tokens))
        generation = {path: values[1:] for path, values in generation.items()}
        installs = sender.last_installs()  # the last sync's, done by the generation above
    finally:
        if sender is not None:
            sender.close()
        server.stop()
    return {"machine": machine_info(), "model": resolve_model_path(cfg.model),
            "lora_rank": args.lora_rank, "adapter_bytes": adapter_bytes,
            "backend": sender.backend, "rounds": args.rounds, "sync_s": times,
            "generation_tokens_per_s": generation,
            "lora_nccl_figures": figures, "busy": args.busy, "lora_nccl_install": installs}


def report(result: dict[str, Any]) -> str:
    """The table: median/mean/min per path, and the ratios the LoRA-modes issue targets."""
    med = {name: statistics.median(v) for name, v in result["sync_s"].items()}
    bare = med["bare broadcast"]
    lines = [f"LoRA sync, {result['adapter_bytes'] / 1e6:.1f} MB adapter (r={result['lora_rank']}"
             f"), {result['backend']}, {result['rounds']} rounds, {result['machine']['cpu']}",
             f"{'path':<20}{'median ms':>11}{'mean ms':>10}{'min ms':>9}{'x bare':>9}"
             f"{'MB/s':>9}"]
    for name, values in result["sync_s"].items():
        lines.append(f"{name:<20}{med[name] * 1e3:>11.1f}{statistics.fmean(values) * 1e3:>10.1f}"
                     f"{min(values) * 1e3:>9.1f}{med[name] / bare:>9.2f}"
                     f"{result['adapter_bytes'] / med[name] / 1e6:>9.0f}")
    for pause in ("none", "wait"):
        lines.append(f"lora_hotswap / lora_nccl ({pause}): "
                     f"{med[f'lora_hotswap {pause}'] / med[f'lora_nccl {pause}']:.2f}x")
    for pause, records in result.get("lora_nccl_figures", {}).items():
        if records:
            lines.append(f"lora_nccl {pause}, inside sync() (median ms): " + ", ".join(
                f"{label} {statistics.median(r.get(key, 0.0) for r in records) * 1e3:.1f}"
                for label, key in BREAKDOWN))
            streamed = statistics.fmean(r.get("sync/streamed", 0.0) for r in records)
            slot_copy = statistics.fmean(r["sync/slot_copy"] for r in records)
            install = statistics.median(r["sync/install_s"] for r in records)
            lines.append(f"lora_nccl {pause}: {streamed:.0%} of syncs streamed (no rpc); the "
                         f"installs they report (each the one before): {slot_copy:.0%} "
                         f"straight into the slot, median {install * 1e3:.1f} ms")
    for worker in result.get("lora_nccl_install", []):
        lines.append(f"last lora_nccl install, at the next engine step: {worker.get('path')}, "
                     f"{worker.get('install_s', 0.0) * 1e3:.1f} ms")
    gen = {path: statistics.median(v) for path, v in result["generation_tokens_per_s"].items()}
    lines.append(f"generation tokens/s: lora_nccl {gen['lora_nccl']:.1f}, lora_hotswap "
                 f"{gen['lora_hotswap']:.1f} (hotswap / nccl {gen['lora_hotswap'] / gen['lora_nccl']:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    args = parse_args(argv)
    result = run(args)
    log.info("\n%s", report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        log.info("measurements written to %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
