"""The shared training path without vLLM: real API server -> fetcher -> grpo_step -> recorder
-> checkpoints, and a resumed run that ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import torch

from example_trainer.checkpoint import find_checkpoint
from example_trainer.config import TrainConfig
from example_trainer.model import load_model
from example_trainer.step import grpo_step
from example_trainer.trainer import TrainingRun

STEPS = 4
BATCH = 4


def make_groups(n_groups: int, vocab: int, seed: int = 0) -> list[dict]:
    """Groups of 2 sequences: a shared prompt, varied completions and rewards."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 6))]
        tokens, masks, logprobs = [], [], []
        for _ in range(2):
            completion = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 7))]
            tokens.append(prompt + completion)
            masks.append([-100] * len(prompt) + completion)
            # Off-policy by a little, so ratios differ from 1 and clipping metrics move.
            logprobs.append([1.0] * len(prompt) +
                            [-6.2 + rng.uniform(-0.3, 0.3) for _ in completion])
        groups.append({"tokens": tokens, "masks": masks, "scores": [1.0, 0.0],
                       "inference_logprobs": logprobs,
                       "generation_params": {"temperature": 0.9}})
    return groups


def post_groups(api_url: str, groups: list[dict]) -> None:
    response = requests.post(f"{api_url}/scored_data_list", json=groups, timeout=10)
    assert response.status_code == 200, response.text


def train(cfg: TrainConfig, *, stop_after: int | None = None) -> torch.nn.Module:
    """The loop every mode runs, minus the weight sync (what a mode file contains)."""
    run = TrainingRun.setup(cfg)
    with run:
        for step in run.steps():
            if stop_after is not None and step > stop_after:
                break  # as if the run were killed right after the previous checkpoint
            with run.recorder.timer("data"):
                batch = run.fetcher.next_batch()
            with run.recorder.timer("train"):
                metrics = grpo_step(run.model, run.optimizer, batch, cfg, run.scheduler)
            run.recorder.log(step, metrics)
            run.checkpoints.maybe_save(step, cfg.steps, **run.state())
    return run.model


@pytest.fixture()
def cfg(tiny_model_dir: Path, tmp_path: Path) -> TrainConfig:
    return TrainConfig(model=str(tiny_model_dir), steps=STEPS, batch_timeout=30, batch_size=BATCH,
                       micro_batch_size=2, lr=1e-3, warmup_steps=2, lr_schedule="linear",
                       weight_decay=0.01, save_path=str(tmp_path / "run"), save_every=2,
                       benchmark=True, benchmark_json=str(tmp_path / "bench.json"),
                       seed=0).validate()


def test_train_loop_records_checkpoints_and_changes_weights(cfg, api_url, tmp_path):
    torch.manual_seed(cfg.seed)
    initial, _ = load_model(cfg)
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    post_groups(api_url, make_groups(STEPS * BATCH // 2, vocab=500))

    model = train(replace(cfg, api_url=api_url))

    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before), "every parameter should move under AdamW"
    report = json.loads(Path(cfg.benchmark_json).read_text())
    assert [r["step"] for r in report["steps"]] == list(range(1, STEPS + 1))
    for record in report["steps"]:
        assert all(torch.isfinite(torch.tensor(record[k])) for k in
                   ("policy/loss", "train/grad_norm", "train_s", "peak_mem_gib"))
        assert record["train/tokens"] > 0 and record["tokens_per_s"] > 0
    assert report["steps"][0]["policy/ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert set(report["summary"]) >= {"step_s", "train_s", "data_s", "peak_mem_gib"}
    # Checkpoints at steps 2 and 4; `latest` names the final one, no temporary dirs remain.
    run = Path(cfg.save_path)
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000002", "step-000004"]
    assert find_checkpoint(run) == run / "step-000004"
    status = requests.get(f"{api_url}/status", timeout=5).json()
    assert status["current_step"] == STEPS and status["queue_size"] == 0


def test_resume_matches_uninterrupted_run(cfg, api_url, tmp_path):
    from conftest import free_port, start_api_server, stop_process_group

    groups = make_groups(STEPS * BATCH // 2, vocab=500, seed=1)
    post_groups(api_url, groups)
    uninterrupted = train(replace(cfg, save_path=str(tmp_path / "a"), benchmark_json="",
                                  api_url=api_url))

    port = free_port()
    server = start_api_server(port)
    try:
        other = f"http://127.0.0.1:{port}"
        post_groups(other, groups)
        interrupted_cfg = replace(cfg, save_path=str(tmp_path / "b"), benchmark_json="",
                                  api_url=other)
        train(interrupted_cfg, stop_after=2)  # "killed" after the step-2 checkpoint
        resumed = train(replace(interrupted_cfg, resume=str(tmp_path / "b")))
    finally:
        stop_process_group(server)

    state_b = resumed.state_dict()
    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(state_b[name], value, rtol=0, atol=1e-6, msg=name)
    final_a = torch.load(tmp_path / "a" / "step-000004" / "trainer_state.pt",
                         weights_only=False)
    final_b = torch.load(tmp_path / "b" / "step-000004" / "trainer_state.pt",
                         weights_only=False)
    assert final_a["step"] == final_b["step"] == STEPS
    assert final_a["scheduler"]["last_epoch"] == final_b["scheduler"]["last_epoch"]
    for pid, state in final_a["optimizer"]["state"].items():
        torch.testing.assert_close(final_b["optimizer"]["state"][pid]["exp_avg_sq"],
                                   state["exp_avg_sq"], rtol=0, atol=1e-9)
