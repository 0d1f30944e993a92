"""The scale-out benchmark on the tiny model: one process against two FSDP2 ranks (gloo).
Memory per rank is counted from the tensors each rank holds, so its ratio is exact here;
speed is only reported (two ranks share two cores)."""

from __future__ import annotations

import json

import pytest

from example_trainer.bench import scale_out


@pytest.mark.slow
def test_two_ranks_hold_about_half_the_training_state(tiny_model_dir, tmp_path):
    out = tmp_path / "scale_out.json"
    assert scale_out.main(["--ranks", "2", "--model", str(tiny_model_dir), "--steps", "2",
                           "--batch-size", "4", "--micro-batch-size", "2", "--prompt-len",
                           "4", "--completion-len", "8", "--dtype", "float32", "--device",
                           "cpu", "--out", str(out)]) == 0
    one, two = json.loads(out.read_text())["rows"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["memory_vs_1"] == 1.0
    # fp32 AdamW: parameters, gradients and two moments, each split in halves (a dimension
    # that does not divide evenly gives one rank a row more)
    for part in ("params", "grads"):
        assert one["state_mib_per_rank"][part] > 0
    assert one["state_mib_per_rank"]["optimizer"] == pytest.approx(
        2 * one["state_mib_per_rank"]["params"])
    assert 0.45 <= two["memory_vs_1"] <= 0.6, two
    assert two["tokens_per_s"] > 0 and one["tokens_per_s"] > 0
