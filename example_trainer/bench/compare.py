"""Every mode on the same work in one run: one JSON, one table, one chart (issue #6).

For each selected mode, in turn, a fresh trajectory API, arithmetic environment and trainer
(which starts its own vLLM) run with the same model, seed, batch and step count, while
vLLM's generation counter and memory are polled (`processes.py`). Then, in the same run,
the bare memcpy and broadcast of each mode's sync bytes are measured, and optionally the
optimizers (`reference.py`). The rows, tables, chart and JSON come from `report.py`; every
mode's sync time is shown as a ratio to both limits. With `--learning` every mode runs like
`./run.sh`'s default run and evaluates every few steps: `learning.py` puts held-out accuracy
and reward on one wall clock per mode (learning.png, bench.json's `learning`).

Nothing here imitates a part: real servers, real vLLM, the trainer as users run it.
This module holds the settings and the run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import DEFAULT_MODEL, MODES
from ..recorder import machine_info
from .learning import draw_learning_chart, format_learning_table, learning_section
from .processes import (counter_increase, failure_reason, find_vllm_server, group_memory,
                        parse_prometheus_counter, run_mode, trainer_command)
from .reference import compare_optimizers, measure_reference, time_shared_memcpy
from .report import (TABLE_COLUMNS, WEIGHT_COPIES, draw_chart, failed_row,
                     format_optimizer_table, format_table, optimizer_rows, ratio, report_text,
                     summarize_mode, write_json)

# The run's pieces, and the helpers its tests reach as `compare.<name>`.
__all__ = ["BenchSettings", "run", "counter_increase", "failure_reason", "find_vllm_server",
           "group_memory", "parse_prometheus_counter", "run_mode", "trainer_command",
           "compare_optimizers", "measure_reference", "time_shared_memcpy", "TABLE_COLUMNS",
           "WEIGHT_COPIES", "draw_chart", "failed_row", "format_optimizer_table",
           "format_table", "optimizer_rows", "ratio", "report_text", "summarize_mode",
           "write_json", "LEARNING_DEFAULTS", "learning_section", "format_learning_table",
           "draw_learning_chart"]

log = logging.getLogger(__name__)


# --learning: the work of `./run.sh`'s default run (run.sh: TRAINER_ARGS, ENV_ARGS), long
# enough to see learning; flags given on the command line win.
LEARNING_DEFAULTS = {"steps": 15, "batch_size": 16, "micro_batch_size": 16, "group_size": 8,
                     "max_tokens": 32}


@dataclass
class BenchSettings:
    """The work every mode does, and where the results go."""
    model: str = DEFAULT_MODEL
    modes: list[str] = field(default_factory=lambda: list(MODES))
    steps: int = 3
    seed: int = 0
    batch_size: int = 8
    micro_batch_size: int = 4
    group_size: int = 8
    max_tokens: int = 32
    partial_credit: float = 0.0
    lora_rank: int = 8
    out_dir: str = ""
    mode_timeout: float = 1800.0
    reference: bool = True
    reference_rounds: int = 5
    optimizers: list[str] = field(default_factory=list)
    optimizer_steps: int = 3
    poll_interval: float = 1.0
    trainer_args: list[str] = field(default_factory=list)
    learning: bool = False   # each mode's own tuned defaults, evaluated every eval_every
    eval_every: int = 2
    eval_size: int = 64


def run(s: BenchSettings) -> dict[str, Any]:
    """The whole comparison; writes `bench.json`, `bench.png` and, when the trainers
    evaluated (`--learning`), `learning.png` into `s.out_dir`."""
    from ..model import resolve_model_path

    out = Path(s.out_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bench.json", out / "bench.png"
    learning_png = out / "learning.png"
    model_path = resolve_model_path(s.model)
    payload: dict[str, Any] = {"machine": machine_info(), "settings": asdict(s),
                               "model_path": model_path, "modes": {}, "reference": [],
                               "table": [], "optimizers": []}
    for mode in s.modes:
        log.info("mode %s: fresh API, environment, trainer and vLLM (logs in %s)", mode,
                 out / mode)
        result = run_mode(mode, s, model_path, out)
        payload["modes"][mode] = result
        log.info("mode %s: %s%s (%.0f s)", mode, result["status"],
                 f" - {result['reason']}" if result["reason"] else "", result["wall_s"]
                 if "wall_s" in result else 0.0)
        write_json(json_path, payload)  # partial results survive a crash of a later mode

    ok = {m: r for m, r in payload["modes"].items() if r["status"] == "ok"}
    if s.reference and ok:
        needs: dict[str, int | None] = {}
        for mode, result in ok.items():
            row = summarize_mode(mode, result.get("steps", []), result["vllm"], [])
            needs[mode] = int(row["sync_bytes"]) if row["sync_bytes"] else None
        try:
            payload["reference"] = measure_reference(
                s.model, needs, rounds=s.reference_rounds, lora_rank=s.lora_rank,
                work=out / "reference")
        except Exception as exc:  # noqa: BLE001 - the modes' rows still stand
            log.error("reference limits failed: %s: %s", type(exc).__name__, exc)
            payload["reference_error"] = f"{type(exc).__name__}: {exc}"

    rows = []
    for mode, result in payload["modes"].items():
        if result["status"] == "ok":
            rows.append(summarize_mode(mode, result.get("steps", []), result["vllm"],
                                       payload["reference"]))
        else:
            rows.append(failed_row(mode, result["status"], result["reason"]))
    payload["table"] = rows

    if s.optimizers:
        payload["optimizers"] = optimizer_rows(compare_optimizers(
            s.model, s.optimizers, steps=s.optimizer_steps, seed=s.seed))

    machine = payload["machine"]
    title = (f"{Path(model_path).name}, {s.steps} steps, batch {s.batch_size}; "
             f"{machine.get('gpu') or machine.get('cpu')}, {machine.get('cores')} cores")
    if rows:
        payload["chart"] = str(draw_chart(rows, png_path, title))
    if s.learning or any(r.get("eval_curve") for r in ok.values()):
        payload["learning"] = learning_section(payload["modes"])
        payload["learning_chart"] = str(draw_learning_chart(
            payload["learning"], learning_png, title + f"; held-out: {s.eval_size} problems"
            if s.learning else title))
    payload["text"] = report_text(payload)
    write_json(json_path, payload)
    log.info("mode comparison (%s):\n%s", title, payload["text"])
    log.info("JSON: %s%s%s", json_path, f"; chart: {png_path}" if rows else "",
             f"; learning chart: {learning_png}" if "learning" in payload else "")
    return payload
