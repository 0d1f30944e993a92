"""The mode comparison's learning view (`example_trainer/bench/learning.py`): curves on one
clock, time to an accuracy, the table and the chart, with hand-computed values."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO
from example_trainer.bench import compare, learning
from example_trainer.bench.__main__ import parse_args
from example_trainer.bench.report import report_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A trainer's benchmark JSON as it writes it: the trainer was started at 1000.0 on the
# benchmark's clock and its training seconds began 7.25 s later (imports, model load).
EVAL_CURVE = [
    {"step": 0, "train_s": 40.0, "accuracy": 0.15, "eval_s": 12.0},   # vLLM start-up behind
    {"step": 2, "train_s": 70.0, "accuracy": 0.45, "eval_s": 11.0},
    {"step": 4, "train_s": 101.0, "accuracy": 0.55, "eval_s": 10.0},  # first >= 0.5
    {"step": 6, "train_s": 130.0, "accuracy": 0.7, "eval_s": 10.0},   # exactly 0.7 counts
    {"step": 8, "train_s": 160.0, "accuracy": 0.62, "eval_s": 9.0}]   # final, after a dip
STEPS = [{"step": 1, "step_s": 45.0, "train/reward_mean": 0.1},
         {"step": 2, "step_s": 12.5},                                  # no reward: time only
         {"step": 3, "step_s": 13.0, "train/reward_mean": 0.4}]


def _report() -> dict:
    return {"status": "ok", "reason": "", "started_unix": 1007.25,
            "trainer_spawned_unix": 1000.0, "eval_curve": EVAL_CURVE, "steps": STEPS,
            "eval_before": 0.15, "eval_after": 0.62}


def test_setup_seconds_from_the_trainer_start_to_its_clock():
    assert learning.setup_seconds(_report(), 1000.0) == 7.25
    assert learning.setup_seconds(_report(), None) == 0.0
    assert learning.setup_seconds({}, 1000.0) == 0.0
    assert learning.setup_seconds(_report(), 1010.0) == 0.0  # never negative


def test_accuracy_curve_shifts_by_set_up_and_keeps_the_step_0_point():
    curve = learning.accuracy_curve(_report(), 7.25)
    assert [p["s"] for p in curve] == [47.25, 77.25, 108.25, 137.25, 167.25]
    assert curve[0] == {"step": 0, "s": 47.25, "train_s": 40.0, "accuracy": 0.15,
                        "eval_s": 12.0}
    assert [p["step"] for p in curve] == [0, 2, 4, 6, 8]
    assert learning.accuracy_curve({}, 7.25) == []


def test_reward_curve_sums_step_times_from_set_up():
    assert learning.reward_curve(STEPS, 7.25) == [
        {"step": 1, "s": 52.25, "reward": 0.1},   # 7.25 + 45
        {"step": 3, "s": 77.75, "reward": 0.4}]   # 7.25 + 45 + 12.5 + 13
    assert learning.reward_curve([], 3.0) == []


def test_time_to_threshold_is_the_first_evaluation_at_or_above_it():
    curve = learning.accuracy_curve(_report(), 7.25)
    assert learning.time_to(curve, 0.5) == 108.25   # 0.45 before it is not enough
    assert learning.time_to(curve, 0.7) == 137.25   # equal counts; the later dip does not
    assert learning.time_to(curve, 0.15) == 47.25   # already there before training
    assert learning.time_to(curve, 0.8) is None
    assert learning.time_to([], 0.5) is None


def test_learning_section_rows_and_table():
    section = learning.learning_section(
        {"legacy": _report(), "full_nccl": {"status": "failed", "reason": "boom"}})
    assert section["thresholds"] == [0.5, 0.7] and "evaluations excluded" in section["clock"]
    assert section["modes"]["legacy"]["setup_s"] == 7.25
    assert len(section["modes"]["legacy"]["accuracy"]) == 5
    assert len(section["modes"]["legacy"]["reward"]) == 2 and "full_nccl" not in \
        section["modes"]
    row, failed = section["table"]
    assert row == {"mode": "legacy", "status": "ok", "reason": "", "steps": 3,
                   "evaluations": 5, "accuracy_before": 0.15, "first_eval_s": 47.25,
                   "final_accuracy": 0.62, "final_eval_s": 167.25, "setup_s": 7.25,
                   "eval_s": 52.0,
                   "time_to_0.5_s": 108.25, "time_to_0.7_s": 137.25}
    assert failed == {"mode": "full_nccl", "status": "failed", "reason": "boom"}
    lines = learning.format_learning_table(section).splitlines()
    assert lines[0] == ("| mode | steps | acc. before | s to 0.5 | s to 0.7 | final acc. | "
                        "s at final eval | first eval s | set-up s | eval s (apart) |")
    assert lines[2] == "| legacy | 3 | 0.150 | 108 | 137 | 0.620 | 167 | 47 | 7 | 52 |"
    assert lines[3] == "| full_nccl | failed: boom | - | - | - | - | - | - | - | - |"
    # A mode that never reaches a threshold: null in the JSON, "-" in the table.
    never = dict(_report(), eval_curve=EVAL_CURVE[:3])
    section = learning.learning_section({"lora_nccl": never})
    assert section["table"][0]["time_to_0.7_s"] is None
    assert learning.format_learning_table(section).splitlines()[2] == \
        "| lora_nccl | 3 | 0.150 | 108 | - | 0.550 | 108 | 47 | 7 | 33 |"


def test_report_text_prints_the_learning_table():
    section = learning.learning_section({"legacy": _report()})
    text = report_text({"table": [], "reference": [], "learning": section})
    assert "| legacy | 3 | 0.150 | 108 | 137 |" in text
    assert "s to 0.5 / 0.7" in text and "held-out evaluations excluded" in text


def test_learning_chart_is_a_png(tmp_path):
    other = dict(_report(), eval_curve=[dict(p, accuracy=p["accuracy"] / 2)
                                        for p in EVAL_CURVE])
    section = learning.learning_section(
        {"legacy": _report(), "lora_nccl": other,
         "full_nccl": {"status": "failed", "reason": "x"}})
    path = learning.draw_learning_chart(section, tmp_path / "learning.png", "unit")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10000


def test_learning_flag_runs_each_mode_like_run_sh_with_evaluations():
    s = parse_args(["--learning"])
    # The same work as run.sh's default run, read from run.sh itself.
    run_sh = (REPO / "run.sh").read_text()
    flags = dict(re.findall(r"(--[a-z-]+) (\d+)", run_sh.split("TRAINER_ARGS=(", 1)[1]
                            .split("\nrun_", 1)[0]))
    assert s.learning and (s.steps, s.batch_size, s.micro_batch_size, s.group_size,
                           s.max_tokens) == tuple(int(flags[f]) for f in (
                               "--steps", "--batch-size", "--micro-batch-size",
                               "--group-size", "--max-tokens")) == (15, 16, 16, 8, 32)
    assert (s.eval_every, s.eval_size) == (2, 64)
    cmd = compare.trainer_command("lora_nccl", s, "http://x", 1234, Path("/r"))
    at = cmd.index("--eval-every")
    assert cmd[at + 1] == "2" and cmd[cmd.index("--eval-size") + 1] == "64"
    assert cmd[cmd.index("--eval-max-tokens") + 1] == "32"  # answers as long as training's
    # Each mode keeps its own tuned learning rate, sync interval and LoRA shape.
    assert not {"--lr", "--sync-every", "--lora-rank", "--lora-alpha"} & set(cmd)
    # Flags given win over --learning's defaults; flags after -- still reach every trainer.
    s = parse_args(["--learning", "--steps", "3", "--eval-every", "1", "--", "--lr", "1e-4"])
    assert (s.steps, s.batch_size, s.eval_every) == (3, 16, 1)
    assert compare.trainer_command("legacy", s, "http://x", 1, Path("/r"))[-2:] == [
        "--lr", "1e-4"]
    # Without --learning: no evaluation and one LoRA rank, as before.
    plain = parse_args([])
    assert (plain.steps, plain.batch_size, plain.learning) == (3, 8, False)
    cmd = compare.trainer_command("lora_nccl", plain, "http://x", 1234, Path("/r"))
    assert cmd[cmd.index("--eval-size") + 1] == "0" and "--eval-every" not in cmd
    assert cmd[cmd.index("--lora-rank") + 1] == "8"
