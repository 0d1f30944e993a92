"""example_trainer.recorder.Recorder: per-step records, summary statistics, JSON, and
optional wandb (offline)."""

from __future__ import annotations

import json
import time

import pytest

from example_trainer.recorder import Recorder


def test_records_summary_and_json(tmp_path):
    before = time.time()
    recorder = Recorder(mode="unit", total_steps=2, benchmark=True,
                        json_path=str(tmp_path / "b.json"))
    for step, pause in ((1, 0.02), (2, 0.04)):
        with recorder.timer("train"):
            time.sleep(pause)
        with recorder.timer("sync"):
            pass
        recorder.log(step, {"train/tokens": 100.0, "policy/loss": 0.5})
    summary = recorder.summary()
    assert summary["train_s"]["total"] == pytest.approx(
        recorder.records[0]["train_s"] + recorder.records[1]["train_s"])
    assert summary["train_s"]["max"] >= 0.04 and recorder.records[0]["data_s"] == 0.0
    assert recorder.records[1]["tokens_per_s"] == pytest.approx(
        100.0 / recorder.records[1]["train_s"])
    recorder.close(eval_after=0.5)
    report = json.loads((tmp_path / "b.json").read_text())
    assert [r["step"] for r in report["steps"]] == [1, 2]
    assert report["eval_after"] == 0.5 and report["machine"]["cores"] >= 1
    assert "train_s" in report["summary"] and report["steps"][0]["peak_mem_gib"] > 0
    # When training seconds began, on the machine's clock (the mode comparison's set-up time)
    assert before <= report["started_unix"] <= time.time()


def test_wandb_logs_every_step_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    recorder = Recorder(mode="unit", total_steps=2, wandb_project="example-trainer-test")
    for step in (1, 2):
        recorder.log(step, {"train/tokens": 10.0, "policy/loss": 0.1 * step})
    recorder.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_time_kept_apart_counts_in_neither_the_step_nor_training_seconds():
    """Evaluation between steps runs under `apart()`: the next step's step_s and the
    learning curve's clock must not include it."""
    rec = Recorder(mode="legacy", total_steps=2)
    with rec.apart():
        time.sleep(1.0)
    with rec.timer("train"):
        time.sleep(0.01)
    record = rec.log(1, {"train/tokens": 1.0})
    # Without the exclusion both would be >= 1 s; the margin absorbs a slow machine.
    assert record["step_s"] < 0.9 and rec.training_seconds() < 0.9, record
    assert rec.apart_s >= 1.0
    # Steps' times add up to the training clock: the mode comparison places each step's
    # reward at the sum of step_s so far.
    with rec.apart():
        time.sleep(0.2)
    record2 = rec.log(2, {})
    assert record["step_s"] + record2["step_s"] == pytest.approx(rec.training_seconds(),
                                                                   abs=0.01)
