"""full_nccl's sync against its floor and against legacy's, in one run on one server.

One vLLM server (the `example_gloo` weight-transfer engine, plus the benchmark-only worker
extension `TransferBenchExtension`) and one trainer model. Every round nudges the weights
(a real new version) and, interleaved so machine noise hits all alike:

- `bare broadcast`: the sync's buckets over a gloo group to vLLM's worker and nothing else
  (no load, no re-pack): the transport's floor;
- `full_nccl`: what the mode's sync does (start, packed buckets, load in place, finish with
  the CPU re-pack, prefix-cache reset), inside `/pause?mode=wait` + `/resume`;
- `layerwise`: the same sync loaded through vLLM's layerwise reload (the engine's
  `load="layerwise"`, what vLLM's own NCCL engine does; `--no-layerwise` skips it).

Then the CPU re-pack alone (`floor = bare broadcast + re-pack`), the parity after the last
sync of each kind, the trainer's resident memory during a sync
against between syncs (sampled every millisecond in a thread), vLLM's worker's peak during a
sync against before it, and legacy's sync (save the model, restart vLLM on it). Prints
ratios (no pass/fail) and writes JSON.

    python -m example_trainer.bench.full_sync                 # embedded SmolLM2-135M
    python -m example_trainer.bench.full_sync --model DIR --rounds 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_weights
from ..config import DEFAULTS, TrainConfig
from ..model import load_model, resolve_model_path
from ..parity import check_parity, default_probe_tokens
from ..recorder import machine_info
from ..trainer import pin_trainer_cores, remove_dir, start_vllm
from ..vllm.gloo_engine import plan_buckets
from ..vllm.server import free_port
from ..vllm.shared_weights import process_memory
from ..vllm.worker_extension import broadcast, make_group
from ..weight_sync import drop_stale_prefix_cache
from ..weight_transfer import FullWeightSender, weight_transfer_options

log = logging.getLogger("example_trainer.bench.full_sync")

EXTENSION = "example_trainer.vllm.transfer_bench.TransferBenchExtension"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULTS.model, help="model directory (default: "
                   "the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--rounds", type=int, default=10, help="timed syncs per path")
    p.add_argument("--bucket-mib", type=float, default=DEFAULTS.sync_bucket_mib)
    p.add_argument("--no-layerwise", dest="layerwise", action="store_false",
                   help="skip the syncs through vLLM's layerwise reload")
    p.add_argument("--legacy-rounds", type=int, default=1, help="timed vLLM restarts "
                   "(legacy's sync; 0 to skip)")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


@torch.no_grad()
def nudge(model: torch.nn.Module, generator: torch.Generator) -> None:
    """A new version: every parameter moves a little (enough to move the log-probs)."""
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 1e-3)


class RSSSampler:
    """Peak resident memory of this process while a block runs, sampled every `period` s."""

    def __init__(self, period: float = 0.001) -> None:
        self.period, self.peak, self._stop = period, 0.0, threading.Event()

    def __enter__(self) -> "RSSSampler":
        self.peak = process_memory().get("rss_gib", 0.0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, process_memory().get("rss_gib", 0.0))
            time.sleep(self.period)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_memory().get("rss_gib", 0.0))


def bare_broadcast(client: Any, sizes: list[int], bucket_bytes: int, rounds: int
                   ) -> list[float]:
    """Seconds per bare broadcast of a sync's buckets to vLLM's worker (first round, which
    includes the rpc that makes the worker listen, dropped)."""
    from ..weight_sync import BackgroundCall
    plans = plan_buckets(sizes, bucket_bytes)
    port, prefix = free_port(), f"full-sync-bench-{uuid.uuid4().hex}"
    call = BackgroundCall(lambda: client.collective_rpc(
        "full_sync_bare", kwargs={"host": "127.0.0.1", "port": port, "prefix": prefix,
                                  "bucket_sizes": [p.nbytes for p in plans],
                                  "rounds": rounds + 1}, timeout=600), "full_sync_bare")
    group = make_group("127.0.0.1", port, prefix, 0, 2, "gloo", 120)
    buckets = [torch.zeros(p.nbytes, dtype=torch.uint8) for p in plans]
    times = []
    try:
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            for bucket in buckets:
                broadcast(group, bucket, 120)
            times.append(time.perf_counter() - t0)
        call.join(120)
    finally:
        group.shutdown()
    return times[1:]


def timed_sync(client: Any, sender: FullWeightSender) -> tuple[float, float, dict[str, float]]:
    """One full_nccl sync as the mode runs it (inside `/pause?mode=wait`): seconds, the
    trainer's peak resident GiB during it, and the trainer's split."""
    t0 = time.perf_counter()
    with RSSSampler() as rss, client.paused("wait"):
        parts = sender.sync()
        drop_stale_prefix_cache(client, preempt_running=False)
    return time.perf_counter() - t0, rss.peak, parts


def worker_memory(client: Any, reset_peak: bool = False) -> dict[str, float]:
    return client.collective_rpc("full_sync_memory", kwargs={"reset_peak": reset_peak},
                                 timeout=60)[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig(mode="full_nccl", model=args.model, dtype="float32",
                      sync_bucket_mib=args.bucket_mib, max_token_len=512,
                      vllm_startup_timeout=900.0,  # a shared machine can be slow to start it
                      save_path=tempfile.mkdtemp(prefix="full-sync-bench-"))
    model, tokenizer = load_model(cfg)
    generator = torch.Generator().manual_seed(0)
    if not torch.cuda.is_available():
        pin_trainer_cores({0})  # vLLM's worker binds to core 0
    model_path = resolve_model_path(cfg.model)
    server = start_vllm(cfg, model_path, **weight_transfer_options(cfg),
                        worker_extension_cls=EXTENSION)
    sender = None
    try:
        client = server.client()
        sender = FullWeightSender(client, model, bucket_mib=cfg.sync_bucket_mib,
                                  timeout_s=cfg.sync_timeout)
        sender.join()
        sizes = [p.numel() * p.element_size() for _, p in model.named_parameters()]
        times: dict[str, list[float]] = {"bare broadcast": [], "full_nccl": [],
                                         "layerwise": []}
        layerwise_engine: list[dict[str, float]] = []
        parts: list[dict[str, float]] = []
        engine: list[dict[str, float]] = []  # the worker's split of each update
        between, during, worker_rise = [], [], []
        log.info("timing %d rounds (%.1f MB per sync, %.0f MiB buckets)", args.rounds,
                 sum(sizes) / 1e6, args.bucket_mib)
        for _ in range(args.rounds + 1):  # the first round warms up both paths
            nudge(model, generator)
            times["bare broadcast"].append(statistics.median(
                bare_broadcast(client, sizes, sender.bucket_bytes, 2)))
            if args.layerwise:  # before the in-place sync, so the parity below is its
                client.collective_rpc("full_sync_set_load", kwargs={"load": "layerwise"},
                                      timeout=60)
                times["layerwise"].append(timed_sync(client, sender)[0])
                layerwise_engine.append(
                    client.collective_rpc("full_sync_engine_stats", timeout=60)[0])
                client.collective_rpc("full_sync_set_load", kwargs={"load": "auto"},
                                      timeout=60)
            between.append(process_memory().get("rss_gib", 0.0))
            before = worker_memory(client, reset_peak=True)
            seconds, peak, split = timed_sync(client, sender)
            times["full_nccl"].append(seconds)
            during.append(peak)
            parts.append(split)
            engine.append(client.collective_rpc("full_sync_engine_stats", timeout=60)[0])
            worker_rise.append(worker_memory(client)["peak_rss_gib"] - before["rss_gib"])
        times = {k: v[1:] for k, v in times.items() if v}
        parts, engine, between, during = parts[1:], engine[1:], between[1:], during[1:]
        worker_rise, layerwise_engine = worker_rise[1:], layerwise_engine[1:]
        probe = default_probe_tokens(tokenizer)
        parity = check_parity(model, client, probe, atol=1e-4, served_model=cfg.served_name)
        parity_layerwise = None
        if args.layerwise:  # one more version, loaded layerwise
            nudge(model, generator)
            client.collective_rpc("full_sync_set_load", kwargs={"load": "layerwise"},
                                  timeout=60)
            timed_sync(client, sender)
            parity_layerwise = check_parity(model, client, probe, atol=1e-4,
                                            served_model=cfg.served_name)
        repack = [client.collective_rpc("full_sync_repack", timeout=600)[0]["repack_s"]
                  for _ in range(3)]
        legacy = []
        for i in range(args.legacy_rounds):
            sender.close()  # the group dies with the old server
            sender = None
            t0 = time.perf_counter()
            path = save_weights(Path(cfg.save_path) / f"served-{i}", model, tokenizer)
            server.restart(path)
            legacy.append(time.perf_counter() - t0)
            remove_dir(path)
    finally:
        if sender is not None:
            sender.close()
        server.stop()
    med = {k: statistics.median(v) for k, v in times.items()}

    def medians(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}

    floor = med["bare broadcast"] + statistics.median(repack)
    result = {
        "machine": machine_info(), "model": model_path, "rounds": args.rounds,
        "bucket_mib": args.bucket_mib, "sync_bytes": sum(sizes), "times_s": times,
        "median_s": med, "repack_s": repack, "floor_s": floor,
        "full_nccl_parts_median": medians(parts), "engine_parts_median": medians(engine),
        "x_floor": med["full_nccl"] / floor, "parity_max_abs": parity,
        "layerwise_engine_parts_median": medians(layerwise_engine),
        "layerwise_x_floor": med["layerwise"] / floor if "layerwise" in med else None,
        "parity_layerwise_max_abs": parity_layerwise,
        "legacy_sync_s": legacy,
        "x_faster_than_legacy": (statistics.median(legacy) / med["full_nccl"]
                                 if legacy else None),
        "trainer_rss_between_gib": max(between), "trainer_rss_during_gib": max(during),
        "trainer_rss_extra_mib": (max(d - b for d, b in zip(during, between))) * 1024,
        "worker_rss_rise_mib": max(worker_rise) * 1024}
    return result


def report(r: dict[str, Any]) -> str:
    lines = [f"full_nccl sync, {Path(r['model']).name}, {r['sync_bytes'] / 1e6:.0f} MB per "
             f"sync, {r['bucket_mib']:.0f} MiB buckets, {r['rounds']} rounds (medians)",
             f"  bare gloo broadcast  {r['median_s']['bare broadcast']:.3f} s",
             f"  CPU re-pack          {statistics.median(r['repack_s']):.3f} s",
             f"  floor (sum)          {r['floor_s']:.3f} s",
             f"  full_nccl sync       {r['median_s']['full_nccl']:.3f} s  "
             f"= {r['x_floor']:.2f}x the floor  (parts: " + ", ".join(
                 f"{k.removeprefix('sync/')} {v:.3f}" for k, v in
                 r["full_nccl_parts_median"].items() if k.endswith("_s")) + ")",
             "  in vLLM's worker: " + ", ".join(
                 f"{k} {v:.3f}" for k, v in r["engine_parts_median"].items()),
             f"  parity after the last sync: max |logprob diff| {r['parity_max_abs']:.2e}"]
    if r["layerwise_x_floor"] is not None:
        lines += [f"  through vLLM's layerwise reload {r['median_s']['layerwise']:.3f}"
                  f" s = {r['layerwise_x_floor']:.2f}x the floor (worker: " + ", ".join(
                      f"{k} {v:.3f}" for k, v in r["layerwise_engine_parts_median"].items())
                  + f"); parity {r['parity_layerwise_max_abs']:.2e}"]
    if r["legacy_sync_s"]:
        legacy = statistics.median(r["legacy_sync_s"])
        lines.append(f"  legacy sync (save + vLLM restart) {legacy:.1f} s = "
                     f"{r['x_faster_than_legacy']:.0f}x full_nccl's")
    lines.append(f"  trainer RSS: {r['trainer_rss_between_gib']:.3f} GiB between syncs, "
                 f"{r['trainer_rss_during_gib']:.3f} GiB peak during; largest rise in one sync "
                 f"{r['trainer_rss_extra_mib']:.1f} MiB (bucket {r['bucket_mib']:.0f} MiB)")
    lines.append(f"  vLLM worker: largest rise during a sync {r['worker_rss_rise_mib']:.0f} MiB "
                 "(peak over the resident size before it)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    args = parse_args(argv)
    result = run(args)
    text = report(result)
    log.info("\n%s", text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
