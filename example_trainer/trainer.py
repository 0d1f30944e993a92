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

Data parallel (`torchrun --nproc-per-node N -m example_trainer`, distributed.py): `setup`
starts the process group, shards the model with FSDP2 and builds the sharded optimizer;
without torchrun (WORLD_SIZE unset or 1) none of it runs. A mode's loop is the same on every
rank; the run routes what only rank 0 may do, so a mode file needs no distributed code:
- `run.fetcher` (distributed.RankZeroFetcher): rank 0 registers with the API and fetches,
  every rank gets the same batch; `grpo_step` then trains this rank's share of it (the
  sharded model carries its Dist) with the math of one process, metrics summed over ranks;
- `run.serve` starts vLLM on rank 0; the other ranks get an `OtherRankVLLM`, a handle whose
  calls do nothing (the one deliberate no-op: a mode's `vllm.restart(...)` is rank 0's);
- `run.save_served_weights` gathers the full state dict to rank 0 (CPU memory), which writes
  it; `run.sync` shares rank 0's outcome (its error stops every rank, not only rank 0),
  then waits for every rank at a barrier of --sync-timeout and runs the parity probe (the
  trainer's forward on every rank, vLLM's side on rank 0); `run.evaluate` is rank 0's;
- checkpoints are sharded (`ShardedCheckpointer`, torch.distributed.checkpoint), written by
  every rank; `--resume` reads them (and single-process ones);
- SIGINT/SIGTERM never stop one rank alone: every rank defers them, the ranks agree at each
  step boundary and all stop there (rank 0 waiting for data stops at once and tells the
  others), then write the final checkpoint together;
- only rank 0 logs below WARNING, writes the benchmark JSON and talks to wandb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .api import BatchFetcher, TrajectoryClient
from .checkpoint import (SAFE_POINTS, Checkpointer, Interrupted, find_checkpoint,
                         guard_optimizer_updates, load_pending_batches, load_trainer_state,
                         save_weights)
from .config import ConfigError, TrainConfig
from .distributed import (Dist, RankZeroFetcher, any_rank_signal, broadcast_object,
                          build_sharded_optimizer, gather_full_state_dict, init_distributed,
                          on_main, shard_model)
from .distributed_checkpoint import ShardedCheckpointer, is_sharded_checkpoint, load_checkpoint
from .evaluation import held_out_accuracy, plot_learning_curve
from .model import load_model, resolve_model_path
from .optim import build_optimizer, build_scheduler
from .parity import ParityProbe, default_probe_tokens, trainer_probe_logprobs
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
    dist: Dist | None = None  # this rank's place under torchrun; None: one process

    @classmethod
    def setup(cls, cfg: TrainConfig, trains: str = "full", *,
              load: Callable[..., tuple[torch.nn.Module, Any]] = load_model,
              vllm: VLLM | None = None) -> "TrainingRun":
        """Everything before the loop; resumes model, optimizer, schedule, RNG and step.

        `trains` is the mode's TRAINS ("full" or "lora"). `load(cfg, resume_from=...)` gives
        (model, tokenizer); a mode whose model is not loaded from disk (shared_vllm aliases
        vLLM's weights) passes its own, with the `vllm` it opened first: the run then owns
        that server and stops it on exit, or here if set-up fails.

        Under torchrun (module docstring) the process group starts here and the run owns it."""
        dist: Dist | None = None
        try:
            cfg.check_trains(trains)
            cfg = dataclasses.replace(cfg, trains=trains)
            dist = init_distributed(cfg)  # None without torchrun: no process group
            if dist is not None and not dist.is_main:  # one log: rank 0's
                logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
            torch.manual_seed(cfg.seed)
            checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
            sharded = checkpoint is not None and is_sharded_checkpoint(checkpoint)
            if sharded and dist is None:
                raise ConfigError(f"{checkpoint} is a sharded checkpoint (written under "
                                  "torchrun): resume it under torchrun (any number of ranks "
                                  "above 1; ./run.sh --nproc N)")
            # a sharded checkpoint holds no Hugging Face weights: they come from load_checkpoint
            model, tokenizer = load(cfg, resume_from=None if sharded else checkpoint)
            if dist is not None:
                shard_model(model, cfg, dist)
                optimizer = build_sharded_optimizer(cfg, model)
            else:
                optimizer = build_optimizer(  # fp32 masters for bf16/fp16 weights (or off)
                    cfg.optimizer, model.parameters(), cfg.lr, weight_decay=cfg.weight_decay,
                    master_weights=None if cfg.master_weights == "auto" else False)
            scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps,
                                        cfg.lr_schedule)
            if checkpoint is None:
                resumed = {}
            elif dist is not None:
                resumed = load_checkpoint(checkpoint, model, optimizer, scheduler)
            else:
                resumed = load_trainer_state(checkpoint, optimizer, scheduler)
            start = resumed.get("step", 0)
            # vLLM started after set-up on the same GPU takes its share of memory: keep it
            # out of the micro-batch probe (a server already running is counted as used).
            reserve = (int(cfg.vllm_gpu_memory_utilization * torch.cuda.mem_get_info()[1])
                       if torch.cuda.is_available() and vllm is None and not cfg.vllm_url
                       else 0)
            if dist is not None and cfg.micro_batch_tokens == -1:
                tokens = 0  # every rank must split alike: a per-rank probe could disagree
                log.info("--micro-batch-tokens auto is not probed on several ranks: "
                         "micro-batches keep --micro-batch-size %d sequences",
                         cfg.micro_batch_size)
            else:
                tokens = resolve_micro_batch_tokens(cfg, model, optimizer,
                                                    reserve_bytes=reserve)
            step_config = StepConfig.from_config(cfg, micro_batch_tokens=tokens)
            main = dist is None or dist.is_main
            fetcher: Any = None
            if main:  # the trajectory API is rank 0's alone
                client = TrajectoryClient(cfg.api_url)
                client.wait_until_up(cfg.api_timeout)
                fetcher = BatchFetcher(client, batch_size=cfg.batch_size,
                                       max_token_len=cfg.max_token_len, num_steps=cfg.steps,
                                       pad_id=tokenizer.pad_token_id,
                                       vocab_size=len(tokenizer), std_norm=cfg.adv_std_norm,
                                       batch_timeout=cfg.batch_timeout, starting_step=start,
                                       checkpoint_dir=cfg.save_path,
                                       wandb_project=cfg.wandb_project,
                                       wandb_group=cfg.wandb_group, leases=True,
                                       resume_lease=resumed.get("lease"))
            if dist is not None:
                fetcher = RankZeroFetcher(dist, fetcher, start)
            recorder = Recorder(mode=cfg.mode, total_steps=cfg.steps,
                                benchmark=cfg.benchmark and main,
                                json_path=cfg.benchmark_json if main else "",
                                wandb_project=cfg.wandb_project if main else "",
                                wandb_group=cfg.wandb_group, config=cfg)
            checkpoints = (Checkpointer(cfg.save_path, cfg.save_every, cfg.keep_checkpoints)
                           if dist is None else
                           ShardedCheckpointer(cfg.save_path, dist, cfg.save_every,
                                               cfg.keep_checkpoints))
        except BaseException:
            if vllm is not None:
                vllm.stop()
            if dist is not None:
                dist.close()
            raise
        recorder.add_source(fetcher.metrics)
        fetcher.replay = load_pending_batches(checkpoint) if checkpoint else []
        fetcher.publish_weight_version(start)  # vLLM will first serve the starting weights
        run = cls(cfg, model, tokenizer, optimizer, scheduler, fetcher, recorder, checkpoints,
                  start, model_path=resolve_model_path(cfg.model), step_config=step_config,
                  dist=dist)
        if vllm is not None:
            run._adopt(vllm)
        return run

    @property
    def is_main(self) -> bool:
        """Rank 0, or the only process: the one that talks to the API and vLLM, and logs."""
        return self.dist is None or self.dist.is_main

    # --- vLLM ---------------------------------------------------------------------------

    def serve(self, model_path: str | Path, **options: Any) -> VLLM:
        """The vLLM server this run syncs to: started on `model_path` with `options`, or the
        user's (--vllm-url); stopped when the run exits, however it exits. Under torchrun
        rank 0 starts it; the other ranks get an `OtherRankVLLM` (module docstring)."""
        if not self.is_main:
            if (not torch.cuda.is_available() and not self.cfg.vllm_url
                    and os.environ.get("GROUP_RANK", "0") == "0"):
                pin_trainer_cores({0})  # rank 0's vLLM worker binds core 0 of this machine
            self.vllm = OtherRankVLLM()
            return self.vllm
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
        has already sent and published the current weights.

        Under torchrun the block runs on every rank (a gather is collective; vLLM calls are
        rank 0's); rank 0's outcome is then shared, so its error stops every rank."""
        if self.dist is not None:
            with self._sync_ranks(step, metrics):
                yield
            return
        with self.recorder.timer("sync"), self.vllm.guard():
            yield
            self.fetcher.publish_weight_version(step)
            self._synced_step = step
        if self._probe is not None:
            metrics |= self._probe.check()

    @contextlib.contextmanager
    def _sync_ranks(self, step: int, metrics: dict[str, float]) -> Iterator[None]:
        """`sync` on several ranks: the block, rank 0's outcome shared, a barrier of
        --sync-timeout (a rank that never arrives fails the run naming it), parity."""
        with self.recorder.timer("sync"):
            failure: BaseException | None = None
            try:
                with self.vllm.guard():
                    yield
                    self.fetcher.publish_weight_version(step)
            except BaseException as err:  # noqa: BLE001 - shared with the other ranks below
                failure = err
            # rank 0's error reaches every rank (RankFailed); a rank's own error is its own
            on_main(self.dist, lambda: _reraise(failure) if failure is not None else None)
            if failure is not None:
                raise failure
            self.dist.barrier(timeout=self.cfg.sync_timeout)
            self._synced_step = step
        if self.cfg.parity_check:
            # The trainer's forward of a sharded model is collective: every rank runs it.
            ours = trainer_probe_logprobs(self.model, default_probe_tokens(self.tokenizer))

            def check() -> dict[str, float]:
                self._probe.trainer_logprobs = ours
                return self._probe.check()
            metrics |= on_main(self.dist, check) or {}

    # --- the loop -----------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        """1-based numbers of the steps still to run. Started once vLLM serves the starting
        weights: takes the parity probe's first reading (--parity-check). Between steps,
        with --eval-every, evaluates right after a sync (time kept apart from the steps')."""
        if self.cfg.parity_check and self.vllm is not None and self._probe is None \
                and self.is_main:
            probe = ParityProbe if self.dist is None else ShardedParityProbe
            self._probe = probe(self.model, self.tokenizer, self.vllm.client,
                                self.cfg.served_name, atol=self.cfg.parity_atol,
                                sampled=self.cfg.is_lora, guard=self.vllm.guard)
        every = self.cfg.eval_every
        for step in range(self.start_step + 1, self.cfg.steps + 1):
            if self.dist is not None:  # all ranks stop here, together, on any rank's signal
                signum = any_rank_signal(self.dist, SAFE_POINTS.pending)
                if signum:
                    raise Interrupted(signum)
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
        never reads a half-written one. Sharded: collective; gathered to rank 0's CPU memory
        and written by rank 0 (every rank returns the path)."""
        path = Path(self.cfg.save_path) / f"served-step-{step:06d}"
        if self.dist is not None:
            full = gather_full_state_dict(self.model)  # empty except on rank 0
            if not self.dist.is_main:
                return path
            path = save_weights(path, self.model, self.tokenizer, state_dict=full)
            del full
        else:
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
        training seconds so far, accuracy, evaluation seconds kept apart). Rank 0's only."""
        if not self.is_main:
            return None
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
        if when == "after":  # the figure a first run is judged by: start to final answer
            self.results["wall_s"] = round(process_seconds(), 1)
            self.results["eval_s"] = round(sum(p["eval_s"] for p in
                                               self.results["eval_curve"]), 1)
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
        if self.dist is not None:
            # Signals wait for the step boundary where the ranks agree (`steps`); rank 0,
            # waiting for data, stops the wait at once and tells the other ranks.
            SAFE_POINTS.enter()

            def stop_waiting() -> None:
                if SAFE_POINTS.pending is not None:
                    signum, SAFE_POINTS.pending = SAFE_POINTS.pending, None
                    raise Interrupted(signum)
            self.fetcher.add_watchdog(stop_waiting)

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
            if self.dist is not None:
                self.dist.close()
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
        if self.dist is not None:
            try:  # the final checkpoint is collective: is every rank here?
                self.dist.barrier(timeout=cfg.sync_timeout)
            except Exception as err:  # noqa: BLE001 - a rank died or hangs: no collective
                log.error("no final checkpoint: not every rank reached it (%s); resume from "
                          "the last one in %s", str(err).splitlines()[0], cfg.save_path)
                return None
        if self._in_update:
            log.error("the optimizer update was cut short by %s, so parameters may be half "
                      "updated: no final checkpoint; resume from the last one in %s",
                      type(exc).__name__, cfg.save_path)
            return None
        done = self.completed_step()
        pending = self.fetcher.untrained(done)
        if self.dist is not None:  # rank 0 knows what was taken from the API: it decides
            done, unsaved = broadcast_object(self.dist, (done, bool(pending)))
        else:
            unsaved = bool(pending)
        path: Path | None = None
        if done == self.checkpoints.last_saved_step and not unsaved:
            path = self.checkpoints.root / f"step-{done:06d}"
            what = f"checkpoint {path} (already saved)"
        elif done == self.start_step and broadcast_or_local(
                self.dist, pending == self._resumed_pending):
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
        if "wall_s" in self.results:
            lines.append(f"  wall time        {self.results['wall_s']:.0f} s from the trainer's "
                         f"start to the end of the final evaluation (evaluations "
                         f"{self.results['eval_s']:.0f} s)")
        lines += [f"  mean step time   {mean('step_s'):.2f} s (train {mean('train_s'):.2f}, "
                  f"sync {mean('sync_s'):.2f}, data wait {mean('data_s'):.2f})",
                  f"  rejected groups  {self.fetcher.rejected_groups}",
                  f"  checkpoints      {self.cfg.save_path}"]
        if self.cfg.benchmark_json:
            lines.append(f"  benchmark JSON   {self.cfg.benchmark_json}")
        return "\n".join(lines)


class OtherRankVLLM:
    """The vLLM handle of a rank other than 0 under torchrun: rank 0 alone starts and talks to
    vLLM, so what a mode calls here does nothing (`restart` reports 0 s)."""

    url = ""
    client = None
    server = None
    restarts = 0

    def restart(self, model_path: str | Path | None = None) -> float:
        return 0.0

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def on_restart(self, resync: Callable[[], None]) -> None:
        pass

    def on_served_again(self, announce: Callable[[], None]) -> None:
        pass

    def stop(self) -> None:
        pass


class ShardedParityProbe(ParityProbe):
    """Rank 0's probe for a sharded model: the trainer's log-probs are computed by every rank
    (a collective forward) and handed in as `trainer_logprobs` before `check()`. Full-model
    modes probe a fixed sequence, so the previous and current probe tokens are the same."""

    trainer_logprobs: torch.Tensor | None = None

    def _trainer(self, tokens: list[int], n: int) -> torch.Tensor:
        return self.trainer_logprobs[-n:]


def broadcast_or_local(dist: Dist | None, value: Any) -> Any:
    """Rank 0's `value` on every rank (collective), or `value` itself in one process."""
    return value if dist is None else broadcast_object(dist, value)


def _reraise(err: BaseException) -> None:
    raise err


def process_seconds() -> float:
    """Seconds since this process started (imports, model load and vLLM start-up count)."""
    import psutil
    return time.time() - psutil.Process().create_time()


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def remove_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
