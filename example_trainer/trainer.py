"""Set-up and tear-down every mode shares, so a mode file holds only its loop and its sync.

`TrainingRun` gathers the pieces a loop needs (model, optimizer, schedule, fetcher, recorder,
checkpoints), restores them on `--resume`, and on exit tells the API that training finished
and prints the summary; after an interruption or a failure it first checkpoints the last
whole step, with any batch taken from the API but not yet trained (run_end.py).

The contract with a mode (legacy.py's docstring spells out a sync's duties):
- `TrainingRun.setup(cfg, TRAINS)`: the mode trains the full model or a LoRA adapter;
- `run.serve(...)` gives the mode its vLLM handle (serving.py), started or attached;
- `run.sync_due(step)` says when to sync; `with run.sync(step, metrics):` around the mode's
  transfer times it, guards it against a dying server, publishes the new weight version and,
  with --parity-check, proves vLLM now serves the trainer's weights.

Data parallel (`torchrun --nproc-per-node N -m example_trainer`, distributed.py): `setup`
starts the process group, shards the model with FSDP2 and builds the sharded optimizer (none
of it without torchrun). A mode's loop is the same on every rank; the run routes what only
rank 0 may do, so a mode file needs no distributed code:
- `run.fetcher` (ranks.RankZeroFetcher): rank 0 registers with the API and fetches, every
  rank gets the same batch; `grpo_step` trains this rank's share of it (the sharded model
  carries its Dist) with the math of one process, metrics summed over ranks;
- `run.serve` starts vLLM on rank 0; the other ranks get an `OtherRankVLLM` whose calls do
  nothing (ranks.py); `run.save_served_weights` gathers the full model (or a LoRA adapter) to
  rank 0, which writes it; lora_nccl's and full_nccl's senders gather on every rank and send
  from rank 0; `run.sync` shares rank 0's outcome (its error stops every rank), waits for
  every rank at a barrier of --sync-timeout and runs the parity probe (the trainer's forward
  on every rank, vLLM's side on rank 0); `run.evaluate` is rank 0's;
- checkpoints are sharded (`ShardedCheckpointer`, torch.distributed.checkpoint), written by
  every rank; `--resume` reads any world size's (and single-process ones);
- SIGINT/SIGTERM stop all ranks at the same step boundary (rank 0 waiting for data stops at
  once and tells the others), then they write the final checkpoint together;
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
from .config import TrainConfig
from .distributed import (Dist, build_sharded_optimizer, gather_full_state_dict,
                          init_distributed, shard_model)
from .distributed_checkpoint import (ShardedCheckpointer, check_single_process_resume,
                                     is_sharded_checkpoint, load_checkpoint)
from .evaluation import Evaluations, held_out_accuracy
from .model import load_model, resolve_model_path
from .optim import build_optimizer, build_scheduler
from .parity import ParityProbe, trainer_probe_logprobs
from .ranks import (OtherRankVLLM, RankFailed, RankZeroFetcher, ShardedParityProbe,
                    any_rank_signal, lost_rank_error, on_main)
from .recorder import Recorder
from .run_end import run_summary, save_final_checkpoint
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
            # a sharded checkpoint holds no Hugging Face weights: they come from load_checkpoint
            model, tokenizer = load(cfg, resume_from=None if sharded else checkpoint)
            if dist is not None:
                shard_model(model, cfg, dist)
                optimizer = build_sharded_optimizer(cfg, model)
            else:
                if sharded:  # written by N ranks, resumed by one (weights and state below)
                    check_single_process_resume(cfg, model, checkpoint)
                optimizer = build_optimizer(  # fp32 masters for bf16/fp16 weights (or off)
                    cfg.optimizer, model.parameters(), cfg.lr, weight_decay=cfg.weight_decay,
                    master_weights=None if cfg.master_weights == "auto" else False)
            scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps,
                                        cfg.lr_schedule)
            if checkpoint is None:
                resumed = {}
            elif dist is not None or sharded:  # DCP reshards to this world size
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
            checkpoints = (Checkpointer(cfg.save_path, cfg.save_every, cfg.keep_checkpoints,
                                        last_in_background=True)
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
        self.await_evaluation()  # "before" must see the weights it started on
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
            # The trainer's forward of a sharded model is collective: rank 0 reads vLLM and
            # names the sequences to score, every rank scores them, rank 0 compares.
            sequences = on_main(self.dist, lambda: self._probe.sequences())
            if sequences:  # None: the probe was cut short by a restart
                scores = [trainer_probe_logprobs(self.model, t) for t in sequences]
                metrics |= on_main(self.dist, lambda: self._probe.check_scored(scores)) or {}

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
        if self.dist is not None:  # an adapter's parameters only, for a LoRA mode
            full = gather_full_state_dict(self.model, trainable_only=self.cfg.is_lora)
            if not self.dist.is_main:
                return path
            path = save_weights(path, self.model, None if self.cfg.is_lora else self.tokenizer,
                                state_dict=full)
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
        "after" or "step N"), a point of the learning curve (`Evaluations`). Rank 0's only.
        In one process "before" runs alongside the first steps; the first sync, which
        changes what vLLM serves, waits for it (`await_evaluation`)."""
        if not self.is_main:
            return None
        step = self.completed_step() if when != "before" else self.start_step
        return self.evaluations.run(when, step,
                                    background=when == "before" and self.dist is None)

    def await_evaluation(self) -> None:
        """Finish an evaluation running in the background ("before"), if one does."""
        self.evaluations.finish_pending()

    def __post_init__(self) -> None:
        if self.step_config is None:
            self.step_config = StepConfig.from_config(self.cfg)
        # Where the final checkpoint of an interrupted run may stand: SIGINT/SIGTERM wait
        # while an optimizer update runs, and the hooks record which step it belonged to.
        self._updated_step = self.start_step   # last step whose optimizer update finished
        self.in_update = False  # an update started and has not finished (run_end reads it)
        self.resumed_pending = list(self.fetcher.replay)  # batches the resume brought back
        self._sync_bytes = 0  # bytes of served weights written since the last step record
        self.recorder.add_source(self._pop_sync_bytes)
        self._probe: ParityProbe | None = None
        self._synced_step = self.start_step  # the last step whose weights vLLM serves
        self.evaluations = Evaluations(
            self.cfg, self.recorder, self.results,
            score=lambda: held_out_accuracy(self.cfg, self.vllm.url, self.tokenizer,
                                            self.model_path),
            restarts=lambda: getattr(self.vllm, "restarts", 0), wall_seconds=process_seconds)

        def started() -> None:
            self.in_update = True

        def finished() -> None:
            self.in_update = False
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
        # A rank that died (not rank 0 failing, which the others hear as RankFailed) is the
        # cause to report, and no collective can include it: no final checkpoint then.
        write_failed: BaseException | None = None
        lost = (lost_rank_error(self.dist, self.cfg.save_path)
                if self.dist is not None and exc_type is not None
                and not issubclass(exc_type, RankFailed) else None)
        self.evaluations.pending = None  # one still running: its figure is moot now
        with SAFE_POINTS.stopping():  # a second Ctrl-C must not cut the clean-up short
            try:  # the last step's checkpoint, written while vLLM evaluated; before vLLM
                self.checkpoints.wait()  # stops: shared_vllm's weights may be its memory
            except BaseException as err:  # noqa: BLE001 - raised below, after the clean-up
                log.error("the final checkpoint could not be written: %s", err)
                write_failed = err
            self.children.close()  # stop vLLM (by process group)
            if exc_type is not None and lost is None:
                save_final_checkpoint(self, exc)
            elif lost is not None:
                log.error("no final checkpoint: a rank is gone; resume from the last one in "
                          "%s", self.cfg.save_path)
            self.fetcher.finish(reason)
            if self.vllm is not None and self.vllm.restarts:
                self.results["vllm_restarts"] = self.vllm.restarts
            self.recorder.close(**self.results, rejected_groups=self.fetcher.rejected_groups)
            if self.dist is not None:
                self.dist.close()
        if lost is not None:  # the cause, in one line, not a collective's connection error
            raise lost from exc
        if exc_type is None and write_failed is not None:
            raise write_failed
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

    def summary(self) -> str:
        return run_summary(self)


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
    """Delete a directory a mode wrote for vLLM; under torchrun rank 0's job (it wrote it)."""
    if path is not None and os.environ.get("RANK", "0") == "0":
        shutil.rmtree(path, ignore_errors=True)
