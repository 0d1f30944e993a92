"""Set-up and tear-down every mode shares, so a mode file holds only its loop and its sync.

`TrainingRun` gathers the pieces a loop needs (model, optimizer, schedule, fetcher, recorder,
checkpoints), restores them on `--resume`, and on exit tells the trajectory API that training
finished and prints the run summary; after an interruption or a failure it first checkpoints
the last whole step, with any batch taken from the API but not yet trained.

The contract with a mode (legacy.py's docstring spells out a sync's duties):
- `TrainingRun.setup(cfg, TRAINS)`: the mode says whether it trains the full model or a LoRA
  adapter, and LoRA flags are checked against that;
- `run.serve(...)` gives the mode its vLLM handle (serving.py), started or attached;
- `run.sync_due(step)` says when to sync, and `with run.sync(step, metrics):` around the
  mode's own transfer times it, guards it against a dying server, publishes the new weight
  version and, with --parity-check, proves vLLM now serves the trainer's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .api import BatchFetcher, TrajectoryClient
from .checkpoint import (SAFE_POINTS, Checkpointer, find_checkpoint, guard_optimizer_updates,
                         load_pending_batches, load_trainer_state, save_weights)
from .config import TrainConfig
from .evaluation import held_out_accuracy, plot_learning_curve
from .model import load_model, resolve_model_path
from .optim import build_optimizer, build_scheduler
from .parity import ParityProbe
from .recorder import Recorder
from .serving import VLLM, pin_trainer_cores, start_vllm, vllm_lora_options  # noqa: F401
from .microbatch import resolve_micro_batch_tokens
from .step import StepConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    fetcher: BatchFetcher
    recorder: Recorder
    checkpoints: Checkpointer
    start_step: int = 0
    model_path: str = ""
    vllm: VLLM | None = None
    step_config: StepConfig | None = None  # what grpo_step needs of the config
    results: dict[str, Any] = field(default_factory=dict)
    children: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @classmethod
    def setup(cls, cfg: TrainConfig, trains: str = "full", *,
              load: Callable[..., tuple[torch.nn.Module, Any]] = load_model,
              vllm: VLLM | None = None) -> "TrainingRun":
        """Everything before the loop; resumes model, optimizer, schedule, RNG and step.

        `trains` is the mode's TRAINS ("full" or "lora"). `load(cfg, resume_from=...)` gives
        (model, tokenizer); a mode whose model is not loaded from disk (shared_vllm aliases
        vLLM's weights) passes its own, with the `vllm` it opened first: the run then owns
        that server and stops it on exit, or here if set-up fails."""
        try:
            cfg.check_trains(trains)
            cfg = dataclasses.replace(cfg, trains=trains)
            torch.manual_seed(cfg.seed)
            checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
            model, tokenizer = load(cfg, resume_from=checkpoint)
            optimizer = build_optimizer(  # fp32 masters for bf16/fp16 weights (or off)
                cfg.optimizer, model.parameters(), cfg.lr, weight_decay=cfg.weight_decay,
                master_weights=None if cfg.master_weights == "auto" else False)
            scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps,
                                        cfg.lr_schedule)
            resumed = (load_trainer_state(checkpoint, optimizer, scheduler) if checkpoint
                       else {})
            start = resumed.get("step", 0)
            # vLLM started after set-up on the same GPU takes its share of memory: keep it
            # out of the micro-batch probe (a server already running is counted as used).
            reserve = (int(cfg.vllm_gpu_memory_utilization * torch.cuda.mem_get_info()[1])
                       if torch.cuda.is_available() and vllm is None and not cfg.vllm_url
                       else 0)
            tokens = resolve_micro_batch_tokens(cfg, model, optimizer, reserve_bytes=reserve)
            step_config = StepConfig.from_config(cfg, micro_batch_tokens=tokens)
            client = TrajectoryClient(cfg.api_url)
            client.wait_until_up(cfg.api_timeout)
            fetcher = BatchFetcher(client, batch_size=cfg.batch_size,
                                   max_token_len=cfg.max_token_len, num_steps=cfg.steps,
                                   pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                                   std_norm=cfg.adv_std_norm,
                                   batch_timeout=cfg.batch_timeout, starting_step=start,
                                   checkpoint_dir=cfg.save_path,
                                   wandb_project=cfg.wandb_project,
                                   wandb_group=cfg.wandb_group, leases=True,
                                   resume_lease=resumed.get("lease"))
            recorder = Recorder(mode=cfg.mode, total_steps=cfg.steps, benchmark=cfg.benchmark,
                                json_path=cfg.benchmark_json,
                                wandb_project=cfg.wandb_project, wandb_group=cfg.wandb_group,
                                config=cfg)
        except BaseException:
            if vllm is not None:
                vllm.stop()
            raise
        recorder.add_source(fetcher.metrics)
        fetcher.replay = load_pending_batches(checkpoint) if checkpoint else []
        fetcher.publish_weight_version(start)  # vLLM will first serve the starting weights
        run = cls(cfg, model, tokenizer, optimizer, scheduler, fetcher, recorder,
                  Checkpointer(cfg.save_path, cfg.save_every, cfg.keep_checkpoints), start,
                  model_path=resolve_model_path(cfg.model), step_config=step_config)
        if vllm is not None:
            run._adopt(vllm)
        return run

    # --- vLLM ---------------------------------------------------------------------------

    def serve(self, model_path: str | Path, **options: Any) -> VLLM:
        """The vLLM server this run syncs to: started on `model_path` with `options`, or the
        user's (--vllm-url); stopped when the run exits, however it exits."""
        return self._adopt(VLLM.open(self.cfg, model_path, **options))

    def _adopt(self, vllm: VLLM) -> VLLM:
        self.vllm = vllm
        self.children.callback(vllm.stop)
        self.fetcher.add_watchdog(vllm.health_watch())
        self.recorder.add_source(vllm.pop_metrics)
        vllm.on_served_again(lambda: self.fetcher.publish_weight_version(
            self.completed_step()))
        return vllm

    def sync_due(self, step: int) -> bool:
        """Every --sync-every steps, and after the last step."""
        return step % self.cfg.sync_every == 0 or step == self.cfg.steps

    @contextlib.contextmanager
    def sync(self, step: int, metrics: dict[str, float]) -> Iterator[None]:
        """Around a mode's own transfer: time it, guard it against a dying server, then
        publish `step` as the weight version vLLM serves and, with --parity-check, add the
        probe's proof to `metrics`. After a restart (--restart-vllm-on-failure) the resync
        has already sent and published the current weights."""
        with self.recorder.timer("sync"), self.vllm.guard():
            yield
            self.fetcher.publish_weight_version(step)
            self._synced_step = step
        if self._probe is not None:
            metrics |= self._probe.check()

    # --- the loop -----------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        """1-based numbers of the steps still to run. Started once vLLM serves the starting
        weights: takes the parity probe's first reading (--parity-check). Between steps,
        with --eval-every, evaluates right after a sync (time kept apart from the steps')."""
        if self.cfg.parity_check and self.vllm is not None and self._probe is None:
            self._probe = ParityProbe(self.model, self.tokenizer, self.vllm.client,
                                      self.cfg.served_name, atol=self.cfg.parity_atol,
                                      sampled=self.cfg.is_lora, guard=self.vllm.guard)
        every = self.cfg.eval_every
        for step in range(self.start_step + 1, self.cfg.steps + 1):
            yield step
            if every and step % every == 0 and step < self.cfg.steps \
                    and self._synced_step == step:
                self.evaluate(f"step {step}")

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (keyword arguments of Checkpointer.save)."""
        return dict(model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                    scheduler=self.scheduler, lease=self.fetcher.lease_record())

    def save_served_weights(self, step: int) -> Path:
        """Weights only (no optimizer state) in a fresh directory vLLM can load: the full
        model, or just the adapter for a peft model. A new directory per version, so vLLM
        never reads a half-written one."""
        path = Path(self.cfg.save_path) / f"served-step-{step:06d}"
        path = save_weights(path, self.model, None if self.cfg.is_lora else self.tokenizer)
        if step > self.start_step:  # a sync, not the first copy: joins the step's record
            self._sync_bytes += directory_bytes(path)
        return path

    def _pop_sync_bytes(self) -> dict[str, float]:
        """`sync/bytes`: what this step wrote for vLLM to read (the mode comparison's
        bytes moved per sync, for modes that sync through disk)."""
        nbytes, self._sync_bytes = self._sync_bytes, 0
        return {"sync/bytes": float(nbytes)} if nbytes else {}

    def evaluate(self, when: str) -> float | None:
        """Held-out accuracy through vLLM with the environment's own scorer ("before",
        "after" or "step N"); each point joins the learning curve (`eval_curve`: step,
        training seconds so far, accuracy, evaluation seconds kept apart)."""
        with self.recorder.apart():
            t0 = time.perf_counter()
            accuracy = held_out_accuracy(self.cfg, self.vllm.url, self.tokenizer,
                                         self.model_path)
        if accuracy is None:
            return None
        step = self.completed_step() if when != "before" else self.start_step
        self.results.setdefault("eval_curve", []).append(
            {"step": step, "train_s": round(self.recorder.training_seconds(), 2),
             "accuracy": accuracy, "eval_s": round(time.perf_counter() - t0, 2)})
        if when in ("before", "after"):
            self.results[f"eval_{when}"] = accuracy
        log.info("held-out accuracy %s%s: %.3f (%d problems, T=%.1f)", when,
                 " training" if when in ("before", "after") else "", accuracy,
                 self.cfg.eval_size, self.cfg.eval_temperature)
        if when == "after" and len(self.results["eval_curve"]) > 1:
            plot_learning_curve(self.results["eval_curve"],
                                Path(self.cfg.save_path) / "accuracy.png", title=self.cfg.mode)
        return accuracy

    def __post_init__(self) -> None:
        if self.step_config is None:
            self.step_config = StepConfig.from_config(self.cfg)
        # Where the final checkpoint of an interrupted run may stand: SIGINT/SIGTERM wait
        # while an optimizer update runs, and the hooks record which step it belonged to.
        self._updated_step = self.start_step   # last step whose optimizer update finished
        self._in_update = False                # an update started and has not finished
        self._resumed_pending = list(self.fetcher.replay)
        self._sync_bytes = 0  # bytes of served weights written since the last step record
        self.recorder.add_source(self._pop_sync_bytes)
        self._probe: ParityProbe | None = None
        self._synced_step = self.start_step  # the last step whose weights vLLM serves

        def started() -> None:
            self._in_update = True

        def finished() -> None:
            self._in_update = False
            self._updated_step = self.fetcher.in_flight_step

        guard_optimizer_updates(self.optimizer, on_start=started, on_done=finished)
        # A saved checkpoint commits the API leases it covers (sent with the next poll).
        self.checkpoints.on_saved = self.fetcher.checkpoint_saved

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            reason = "completed"
        elif issubclass(exc_type, KeyboardInterrupt):
            reason = f"interrupted ({getattr(exc, 'name', 'SIGINT')})"
        else:
            reason = f"failed: {exc_type.__name__}"
        with SAFE_POINTS.stopping():  # a second Ctrl-C must not cut the clean-up short
            self.children.close()  # stop vLLM (by process group) before anything else
            if exc_type is not None:
                self._save_final(exc)
            self.fetcher.finish(reason)
            if self.vllm is not None and self.vllm.restarts:
                self.results["vllm_restarts"] = self.vllm.restarts
            self.recorder.close(**self.results, rejected_groups=self.fetcher.rejected_groups)
        if exc_type is None:
            log.info("%s", self.summary())

    def completed_step(self) -> int:
        """The last step whose update has fully happened (optimizer and LR schedule).

        grpo_step steps the schedule once per step, skipped updates included; if a signal
        fell between `optimizer.step()` and `scheduler.step()`, finish the schedule here."""
        done = self.scheduler.last_epoch if self.scheduler is not None else self.start_step
        if self._updated_step == done + 1 and self.scheduler is not None:
            self.scheduler.step()
            done += 1
        return max(done, self._updated_step)

    def _save_final(self, exc: BaseException) -> Path | None:
        """On any abnormal exit: checkpoint the last whole step, with the batches taken from
        the API but not trained, unless that is already on disk. Sets `exc.summary` (the
        CLI's one-line report of an interruption)."""
        cfg = self.cfg
        if self._in_update:
            log.error("the optimizer update was cut short by %s, so parameters may be half "
                      "updated: no final checkpoint; resume from the last one in %s",
                      type(exc).__name__, cfg.save_path)
            return None
        done = self.completed_step()
        pending = self.fetcher.untrained(done)
        path: Path | None = None
        if done == self.checkpoints.last_saved_step and not pending:
            path = self.checkpoints.root / f"step-{done:06d}"
            what = f"checkpoint {path} (already saved)"
        elif done == self.start_step and pending == self._resumed_pending:
            what = ("no new checkpoint (nothing trained since "
                    + (f"resuming from {cfg.resume})" if cfg.resume else "the start)"))
        else:
            in_flight_pending = bool(pending) and pending[0] is self.fetcher.in_flight
            rng = self.fetcher.in_flight_rng if in_flight_pending else None
            try:
                path = self.checkpoints.save(done, **self.state(), pending=pending or None,
                                             rng=rng)
            except Exception as err:  # noqa: BLE001 - report, keep the original error
                log.error("final checkpoint at step %d failed (%s: %s); the previous ones "
                          "in %s are intact", done, type(err).__name__, err, cfg.save_path)
                what = "final checkpoint FAILED"
            else:
                what = f"saved {path}" + (f" with {len(pending)} untrained batch(es) that a "
                                          "resume trains first" if pending else "")
        if path is not None:
            resume = f"resume with --resume {cfg.save_path}"
        elif what.startswith("no new"):
            resume = f"resume with --resume {cfg.resume}" if cfg.resume else "nothing to resume"
        else:
            resume = "see the log above"
        summary = (f"stopped after step {done} of {cfg.steps}: {what}; child processes "
                   f"stopped, API told; {resume}")
        if isinstance(exc, KeyboardInterrupt):
            exc.summary = f"interrupted by {getattr(exc, 'name', 'SIGINT')}, {summary}"
        else:
            log.info("%s", summary)
        return path

    def summary(self) -> str:
        records = self.recorder.records
        if not records:
            return "no steps were run"
        mean = lambda key: sum(r.get(key, 0.0) for r in records) / len(records)  # noqa: E731
        lines = [f"run summary ({self.cfg.mode}):",
                 f"  steps            {records[-1]['step']}",
                 f"  reward           first {records[0].get('train/reward_mean', 0):.3f} -> "
                 f"last {records[-1].get('train/reward_mean', 0):.3f}"]
        if "eval_before" in self.results:
            lines.append(f"  held-out acc.    {self.results['eval_before']:.3f} -> "
                         f"{self.results.get('eval_after', float('nan')):.3f} "
                         f"(T={self.cfg.eval_temperature})")
        lines += [f"  mean step time   {mean('step_s'):.2f} s (train {mean('train_s'):.2f}, "
                  f"sync {mean('sync_s'):.2f}, data wait {mean('data_s'):.2f})",
                  f"  rejected groups  {self.fetcher.rejected_groups}",
                  f"  checkpoints      {self.cfg.save_path}"]
        if self.cfg.benchmark_json:
            lines.append(f"  benchmark JSON   {self.cfg.benchmark_json}")
        return "\n".join(lines)


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def remove_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
