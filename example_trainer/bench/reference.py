"""In-process measurements the mode comparison sets the modes against.

`measure_reference`: what moving each mode's sync bytes costs at the least, measured in the
same run as the modes: a bare copy into a shared-memory mapping and a bare
`torch.distributed` broadcast (gloo on CPU, NCCL on GPU) of the same bytes from this process
to a vLLM worker, over the group `lora_nccl` uses (no rpc, no install).
`compare_optimizers`: each optimizer's step time and state memory on the same model and
batch (`--optimizers`), without vLLM.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .report import _bytes

log = logging.getLogger(__name__)


def time_shared_memcpy(nbytes: int, rounds: int, device: torch.device) -> list[float]:
    """Seconds per copy of `nbytes` from this process's memory into a shared-memory
    mapping another process could read without a copy: the floor of any same-machine sync."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="example-trainer-bench-", dir=shm)
    os.close(fd)
    try:
        dst = torch.from_file(name, shared=True, size=nbytes, dtype=torch.uint8)
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).to(device)
        times = []
        for _ in range(rounds + 1):  # the first round faults the pages in
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times[1:]
    finally:
        os.unlink(name)


def measure_reference(model: str, needs: dict[str, int | None], *, rounds: int,
                      lora_rank: int, work: Path) -> list[dict[str, Any]]:
    """Bare memcpy and bare broadcast (to a vLLM worker, over the group lora_nccl uses) of
    each needed byte count; `needs` maps a mode to its bytes per sync, or None for "the
    whole model" (shared_vllm). Starts one vLLM with LoRA and the LoRAReceiver extension."""
    from ..config import TrainConfig
    from ..model import load_model, resolve_model_path
    from ..trainer import pin_trainer_cores, start_vllm, vllm_lora_options
    from ..vllm.server import free_port as vllm_port
    from ..weight_sync import EXTENSION, AdapterBroadcaster

    cfg = TrainConfig(mode="lora_nccl", trains="lora", model=model, lora_rank=lora_rank, dtype="float32",
                      save_path=str(work), vllm_port=vllm_port(), max_token_len=256)
    torch.manual_seed(cfg.seed)
    peft_model, _ = load_model(cfg)
    model_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters()
                      if "lora_" not in n)
    affinity = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        pin_trainer_cores({0})  # vLLM's worker binds to core 0, as in every mode
    server = start_vllm(cfg, resolve_model_path(cfg.model), **vllm_lora_options(cfg),
                        worker_extension_cls=EXTENSION)
    sender = None
    entries: dict[int, dict[str, Any]] = {}
    try:
        sender = AdapterBroadcaster(server.client(), peft_model, "policy",
                                    backend=cfg.lora_sync_backend)
        sender.join()
        device = sender.buckets[0].device
        sizes = {"adapter": sender.nbytes, "model": model_bytes}
        for mode, nbytes in needs.items():
            sizes.setdefault(mode, int(nbytes) if nbytes else model_bytes)
        for what, nbytes in sizes.items():
            if nbytes in entries:
                entries[nbytes]["used_by"].append(what)
                continue
            buckets = None if what == "adapter" else [
                torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device)]
            broadcast = sender.time_bare_broadcast(rounds, buckets=buckets)
            memcpy = time_shared_memcpy(nbytes, rounds, device)
            entries[nbytes] = {"what": what, "bytes": nbytes, "used_by": [what],
                               "broadcast_s": statistics.median(broadcast),
                               "memcpy_s": statistics.median(memcpy),
                               "broadcast_rounds": broadcast, "memcpy_rounds": memcpy,
                               "backend": sender.backend}
            log.info("reference %s: %s, broadcast %.4f s, memcpy %.4f s", what,
                     _bytes(nbytes), entries[nbytes]["broadcast_s"],
                     entries[nbytes]["memcpy_s"])
    finally:
        if sender is not None:
            sender.close()
        server.stop()
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
    return list(entries.values())


# --------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------

def fixed_batch(vocab_size: int, *, size: int = 4, length: int = 64, seed: int = 0) -> Any:
    """A random but fixed batch: half prompt, half trained tokens, advantages +-1."""
    from ..batch import Batch
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (size, length), generator=gen)
    loss_mask = torch.zeros(size, length - 1)
    loss_mask[:, length // 2:] = 1.0
    signs = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(size)])
    return Batch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                 loss_mask=loss_mask, advantages=signs[:, None].expand(size, length - 1).clone(),
                 old_logprobs=torch.full((size, length - 1), float("nan")), ref_logprobs=None,
                 temperatures=torch.ones(size), scores=signs.clone())


def compare_optimizers(model: str, names: Sequence[str], *, steps: int, seed: int
                       ) -> list[dict[str, Any]]:
    """Full fine-tuning steps of the same model on the same batch with each optimizer."""
    from ..config import TrainConfig
    from ..model import load_model
    from ..optim import build_optimizer, optimizer_state_bytes
    from ..step import grpo_step

    results = []
    for name in names:
        cfg = TrainConfig(mode="legacy", model=model, seed=seed, optimizer=name,
                          micro_batch_size=4, lr=1e-5)
        try:
            torch.manual_seed(seed)
            net, tokenizer = load_model(cfg)
            optimizer = build_optimizer(name, net.parameters(), cfg.lr,
                                        weight_decay=cfg.weight_decay)
            marks: list[float] = []
            optimizer.register_step_pre_hook(lambda *_: marks.append(time.perf_counter()))
            optimizer.register_step_post_hook(lambda *_: marks.append(time.perf_counter()))
            batch = fixed_batch(len(tokenizer), seed=seed)
            step_s, opt_s = [], []
            for i in range(steps + 1):  # the first step allocates the state: dropped
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.clear()
                t0 = time.perf_counter()
                grpo_step(net, optimizer, batch, cfg)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i:
                    step_s.append(time.perf_counter() - t0)
                    opt_s.append(marks[1] - marks[0] if len(marks) == 2 else float("nan"))
            state = optimizer_state_bytes(optimizer)
            results.append({"name": name, "status": "ok", "reason": "",
                            "step_s": step_s, "step_median_s": statistics.median(step_s),
                            "optimizer_step_median_s": statistics.median(opt_s),
                            "state_bytes": state["cpu"] + state["accelerator"],
                            "accelerator_state_bytes": state["accelerator"], "state": state,
                            "params": sum(p.numel() for p in net.parameters())})
            log.info("optimizer %s: step %.3f s, state %.1f MiB", name,
                     results[-1]["step_median_s"], results[-1]["state_bytes"] / 2**20)
            del net, optimizer
        except Exception as exc:  # noqa: BLE001 - e.g. bitsandbytes without CPU kernels
            log.warning("optimizer %s failed: %s: %s", name, type(exc).__name__, exc)
            results.append({"name": name, "status": "failed",
                            "reason": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return results
