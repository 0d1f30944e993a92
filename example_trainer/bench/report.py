"""The mode comparison's report: one row per mode, the markdown tables, the chart, the JSON.

Pure functions of the trainers' per-step records, the vLLM monitor's result and the
reference limits (unit-tested with hand-computed values), plus `draw_chart` (matplotlib,
imported only when a chart is drawn).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from .learning import format_learning_table, save_chart

# What each mode keeps in memory (README, modes table); on CPU vLLM also keeps packed GEMM
# copies of its linear weights (docs/vllm-cpu.md, "Packed linears"), whatever the mode.
WEIGHT_COPIES = {"legacy": "2 full", "shared_vllm": "1", "lora_hotswap": "base 2 + adapter",
                 "lora_nccl": "base 2 + adapter", "full_nccl": "2 full (+1 bucket in a sync)"}
# Modes that move no bytes between processes, by construction (the metric is then absent).
BYTES_BY_CONSTRUCTION = {"shared_vllm": 0}
# Modes whose sync runs inside the train timer (shared_vllm: inside optimizer.step()).
SYNC_INSIDE_TRAIN = {"shared_vllm"}


# --------------------------------------------------------------------------------------
# Rows and tables (unit-tested with hand-computed values)
# --------------------------------------------------------------------------------------

def ratio(value: float | None, limit: float | None) -> float | None:
    """value / limit, or None where either is unknown or the limit is not positive."""
    if value is None or limit is None or not limit > 0:
        return None
    return value / limit


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize_mode(mode: str, records: list[dict[str, Any]], vllm: dict[str, Any],
                   reference: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row from a mode's per-step records, its vLLM monitor and the limits.

    Step 1 is left out of the timings when there are more steps: the trainer's clock for it
    starts at set-up, so it holds vLLM's start-up. Sync figures are per sync (steps whose
    sync timer ran); `sync_mean_s` is per step, the share of a step the chart stacks. Bytes
    per sync come from the sync code's own `sync/bytes` metric, else BYTES_BY_CONSTRUCTION."""
    all_records, records = records, records[1:] if len(records) > 1 else records
    syncs = [r for r in records if r.get("sync_s", 0.0) > 0]
    sync_median = _median([r["sync_s"] for r in syncs])
    measured = [r["sync/bytes"] for r in syncs if "sync/bytes" in r]
    sync_bytes = _median(measured) if measured else BYTES_BY_CONSTRUCTION.get(mode)
    train_s = sum(r.get("train_s", 0.0) for r in records)
    tokens = sum(r.get("train/tokens", 0.0) for r in records)
    limit = limit_for(mode, sync_bytes, reference)
    memcpy_s = limit.get("memcpy_s") if limit else None
    nested = mode in SYNC_INSIDE_TRAIN
    parts = {"data": [r.get("data_s", 0.0) for r in records],
             "sync": [r.get("sync_s", 0.0) for r in records],
             "train": [r.get("train_s", 0.0) - (r.get("sync_s", 0.0) if nested else 0.0)
                       for r in records]}
    other = [r["step_s"] - sum(p[i] for p in parts.values()) for i, r in enumerate(records)]
    broadcast_s = limit.get("broadcast_s") if limit else None
    return {
        "mode": mode, "status": "ok", "reason": "", "steps": len(all_records),
        "timed_steps": len(records),
        "step_mean_s": _mean([r["step_s"] for r in records]),
        "step_median_s": _median([r["step_s"] for r in records]),
        "train_mean_s": _mean(parts["train"]), "data_mean_s": _mean(parts["data"]),
        "sync_mean_s": _mean(parts["sync"]), "other_mean_s": _mean(other),
        "sync_median_s": sync_median, "syncs": len(syncs),
        "train_tokens_per_s": tokens / train_s if train_s > 0 else None,
        "gen_tokens_per_s": vllm.get("tokens_per_s"),
        "peak_trainer_gib": max((r.get("peak_mem_gib", 0.0) for r in records), default=None),
        "peak_vllm_gib": vllm.get("peak_rss_gib"),
        "weight_copies": WEIGHT_COPIES.get(mode, "?"),
        "sync_bytes": sync_bytes,
        "sync_bytes_per_s": ratio(sync_bytes, sync_median) if sync_bytes else None,
        "limit_bytes": limit.get("bytes") if limit else None,
        "memcpy_s": memcpy_s, "broadcast_s": broadcast_s,
        "x_memcpy": ratio(sync_median, memcpy_s),
        "x_broadcast": ratio(sync_median, broadcast_s),
        "reward": [r.get("train/reward_mean") for r in all_records],
    }


def limit_for(mode: str, sync_bytes: float | None, reference: list[dict[str, Any]]
              ) -> dict[str, Any] | None:
    """The reference entry for this mode's bytes. shared_vllm moves none between processes;
    its CPU sync re-packs vLLM's weights, so it is set against a copy of the whole model."""
    want = sync_bytes if sync_bytes else ("model" if mode == "shared_vllm" else None)
    for entry in reference:
        if want is not None and (entry["bytes"] == want or entry.get("what") == want):
            return entry
    return None


def failed_row(mode: str, status: str, reason: str) -> dict[str, Any]:
    return {"mode": mode, "status": status, "reason": reason,
            "weight_copies": WEIGHT_COPIES.get(mode, "?")}


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


TABLE_COLUMNS = ("mode", "step mean s", "step median s", "sync s (median)", "data wait s",
                 "train tok/s", "vLLM gen tok/s", "trainer peak GiB", "vLLM peak GiB",
                 "weight copies", "bytes/sync", "sync MB/s", "x memcpy", "x broadcast")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one row per mode (failed modes show their reason)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["mode"], f"{row['status']}: {row['reason']}"] + \
                ["-"] * (len(TABLE_COLUMNS) - 2)
        else:
            cells = [row["mode"], _fmt(row["step_mean_s"], ".2f"),
                     _fmt(row["step_median_s"], ".2f"), _fmt(row["sync_median_s"], ".3f"),
                     _fmt(row["data_mean_s"], ".2f"), _fmt(row["train_tokens_per_s"], ".1f"),
                     _fmt(row["gen_tokens_per_s"], ".1f"), _fmt(row["peak_trainer_gib"], ".2f"),
                     _fmt(row["peak_vllm_gib"], ".2f"), row["weight_copies"],
                     _bytes(row["sync_bytes"]),
                     _fmt(row["sync_bytes_per_s"] / 1e6 if row["sync_bytes_per_s"] else None,
                          ".1f"),
                     _fmt(row["x_memcpy"], ".1f"), _fmt(row["x_broadcast"], ".1f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


OPTIMIZER_COLUMNS = ("optimizer", "step median s", "x adamw", "optimizer.step s",
                     "state MiB", "x adamw", "state on accelerator MiB")


def optimizer_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add step-time and state-memory ratios to adamw's (None where adamw is missing)."""
    base = next((r for r in results if r["name"] == "adamw" and r["status"] == "ok"), None)
    out = []
    for r in results:
        r = dict(r)
        if r["status"] == "ok":
            r["x_adamw_step"] = ratio(r["step_median_s"], base and base["step_median_s"])
            r["x_adamw_state"] = ratio(r["state_bytes"], base and base["state_bytes"])
        out.append(r)
    return out


def format_optimizer_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(OPTIMIZER_COLUMNS) + " |",
             "|" + "|".join("---" for _ in OPTIMIZER_COLUMNS) + "|"]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["name"], f"{r['status']}: {r['reason']}"] + ["-"] * 5
        else:
            cells = [r["name"], _fmt(r["step_median_s"], ".3f"), _fmt(r["x_adamw_step"], ".2f"),
                     _fmt(r["optimizer_step_median_s"], ".3f"),
                     _fmt(r["state_bytes"] / 2**20, ".1f"), _fmt(r["x_adamw_state"], ".2f"),
                     _fmt(r["accelerator_state_bytes"] / 2**20, ".1f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Chart, JSON and text
# --------------------------------------------------------------------------------------

def draw_chart(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Left: mean step time per mode, stacked train / sync / data wait / other (the rest
    of the step: parity probe, checkpoint); right: reward over steps per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["mode"] for r in ok]
    bottom = [0.0] * len(ok)
    for key, label, color in (("train_mean_s", "train", "#4c72b0"),
                              ("sync_mean_s", "sync", "#dd8452"),
                              ("data_mean_s", "data wait", "#55a868"),
                              ("other_mean_s", "other", "#b0b0b0")):
        heights = [max(r.get(key) or 0.0, 0.0) for r in ok]
        left.bar(names, heights, bottom=bottom, label=label, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    warm = any(r.get("timed_steps", 0) < r.get("steps", 0) for r in ok)
    left.set_ylabel("mean seconds per step" + (" (after step 1)" if warm else ""))
    left.set_title("step time breakdown")
    left.legend()
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":")]  # modes may overlap
    for i, r in enumerate(ok):
        rewards = [(j + 1, v) for j, v in enumerate(r["reward"]) if v is not None]
        if rewards:
            marker, line = styles[i % len(styles)]
            right.plot(*zip(*rewards), marker=marker, linestyle=line, alpha=0.8,
                       label=r["mode"])
    from matplotlib.ticker import MaxNLocator
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("step")
    right.set_ylabel("train/reward_mean")
    right.set_title("reward over steps")
    if ok:
        right.legend()
    return save_chart(fig, path, title, rows)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write through a temporary file and a rename, so a crash keeps the previous JSON."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)


def report_text(payload: dict[str, Any]) -> str:
    """The table(s) as printed and pasted into the README."""
    parts = []
    if payload["table"]:
        parts.append(format_table(payload["table"]))
        backend = next((e["backend"] for e in payload["reference"]), "-")
        parts.append(f"Timings leave out step 1 (it includes start-up) when a mode ran more "
                     f"steps. x memcpy / x broadcast: median sync time over a bare copy into "
                     f"shared memory / a bare {backend} broadcast to a vLLM worker of the same "
                     "bytes, measured in this run (shared_vllm: of the whole model, what its "
                     "CPU re-pack copies). vLLM peak: RSS summed over its process group.")
    if payload.get("learning"):
        section = payload["learning"]
        parts.append(format_learning_table(section))
        levels = " / ".join(f"{t:g}" for t in section["thresholds"])
        parts.append(f"Learning: seconds are {section['clock']}; s to {levels}: those of the "
                     "first held-out evaluation at or above it ('-': never reached).")
    if payload.get("optimizers"):
        parts.append(format_optimizer_table(payload["optimizers"]))
    return "\n\n".join(parts)
