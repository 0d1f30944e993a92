"""Set-up and tear-down every mode shares, so a mode file holds only its loop and its sync.

`TrainingRun` gathers the pieces a loop needs (model, optimizer, schedule, fetcher, recorder,
checkpoints), restores them on `--resume`, and on exit tells the trajectory API that training
finished and prints the run summary; after an interruption or a failure it first checkpoints
the last whole step, with any batch taken from the API but not yet trained. `start_vllm`
starts (or attaches to) the server a mode syncs to; `ParityProbe` proves after each sync that
vLLM serves the trainer's weights. With --restart-vllm-on-failure a server that exits is
started again and the mode's resync hook (`on_vllm_restart`) makes it serve the current
weights; the environment retries the rollouts the dead server aborted.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .api import BatchFetcher, TrajectoryClient
from .recorder import Recorder
from .checkpoint import (SAFE_POINTS, Checkpointer, find_checkpoint, guard_optimizer_updates,
                         load_pending_batches, load_trainer_state, save_weights)
from .config import TrainConfig
from .model import load_model, resolve_device, resolve_model_path
from .optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# --restart-vllm-on-failure gives up after this many restarts in one run: a server that keeps
# dying has a cause a restart will not fix.
MAX_VLLM_RESTARTS = 3


def pin_trainer_cores(reserved_for_vllm: set[int]) -> None:
    """On CPU, keep the trainer off the core vLLM's worker binds to (unpinned, the two
    fight and a step gets 10-20x slower; DESIGN.md section 5)."""
    available = os.sched_getaffinity(0)
    mine = available - reserved_for_vllm
    if not mine or mine == available:
        return
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    log.info("trainer pinned to cores %s, vLLM to %s", sorted(mine), sorted(reserved_for_vllm))


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
    results: dict[str, Any] = field(default_factory=dict)
    children: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @classmethod
    def setup(cls, cfg: TrainConfig, load: Callable[..., tuple[torch.nn.Module, Any]] = load_model
              ) -> "TrainingRun":
        """Everything before the loop; resumes model, optimizer, schedule, RNG and step.
        `load(cfg, resume_from=...)` gives (model, tokenizer); a mode whose model is not
        loaded from disk (shared_vllm aliases vLLM's weights) passes its own."""
        torch.manual_seed(cfg.seed)
        checkpoint = find_checkpoint(cfg.resume) if cfg.resume else None
        model, tokenizer = load(cfg, resume_from=checkpoint)
        optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr,
                                    weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
        start = load_trainer_state(checkpoint, optimizer, scheduler)["step"] if checkpoint else 0
        client = TrajectoryClient(cfg.api_url)
        client.wait_until_up(cfg.api_timeout)
        fetcher = BatchFetcher(client, batch_size=cfg.batch_size,
                               max_token_len=cfg.max_token_len, num_steps=cfg.steps,
                               pad_id=tokenizer.pad_token_id, vocab_size=len(tokenizer),
                               std_norm=cfg.adv_std_norm, batch_timeout=cfg.batch_timeout,
                               starting_step=start, checkpoint_dir=cfg.save_path,
                               wandb_project=cfg.wandb_project, wandb_group=cfg.wandb_group)
        recorder = Recorder(mode=cfg.mode, total_steps=cfg.steps, benchmark=cfg.benchmark,
                            json_path=cfg.benchmark_json, wandb_project=cfg.wandb_project,
                            wandb_group=cfg.wandb_group, config=cfg)
        recorder.sources.append(fetcher.metrics)
        fetcher.replay = load_pending_batches(checkpoint) if checkpoint else []
        if cfg.vllm_url:
            from .vllm.server import HealthWatch
            fetcher.watchdogs.append(HealthWatch(cfg.vllm_url, timeout_s=cfg.sync_timeout))
        fetcher.publish_weight_version(start)  # vLLM will first serve the starting weights
        return cls(cfg, model, tokenizer, optimizer, scheduler, fetcher, recorder,
                   Checkpointer(cfg.save_path, cfg.save_every, cfg.keep_checkpoints), start,
                   model_path=resolve_model_path(cfg.model))

    def steps(self) -> range:
        """1-based numbers of the steps still to run."""
        return range(self.start_step + 1, self.cfg.steps + 1)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (keyword arguments of Checkpointer.save)."""
        return dict(model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                    scheduler=self.scheduler)

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

    def evaluate(self, vllm_url: str, when: str) -> float | None:
        """Held-out accuracy through vLLM with the environment's own scorer."""
        cfg = self.cfg
        if not cfg.eval_env or cfg.eval_size <= 0:
            return None
        module, _, name = cfg.eval_env.partition(":")
        env_cls = getattr(importlib.import_module(module), name)
        from environments.base import EnvConfig
        env = env_cls(EnvConfig(vllm_url=vllm_url, model_name=cfg.served_name,
                                tokenizer=self.model_path, max_tokens=cfg.eval_max_tokens),
                      tokenizer=self.tokenizer)
        accuracy = env.evaluate(env.eval_items(cfg.eval_size, seed=cfg.seed),
                                temperature=cfg.eval_temperature)
        self.results[f"eval_{when}"] = accuracy
        log.info("held-out accuracy %s training: %.3f (%d problems, T=%.1f)", when, accuracy,
                 cfg.eval_size, cfg.eval_temperature)
        return accuracy

    def start_vllm(self, model_path: str | Path, **options: Any):
        """Start the server this run syncs to; it is stopped when the run exits, however."""
        if resolve_device(self.cfg).type == "cpu" and not torch.cuda.is_available():
            pin_trainer_cores({0})  # VLLMServer binds vLLM's worker to core 0 on CPU
        from .vllm.server import HealthWatch
        server = start_vllm(self.cfg, model_path, **options)
        self.children.callback(server.stop)
        self.vllm = server
        restart = self.restart_vllm if self.cfg.restart_vllm_on_failure else None
        self.fetcher.watchdogs.append(HealthWatch(server.url, server=server,
                                                  timeout_s=self.cfg.sync_timeout,
                                                  on_failure=restart))
        return server

    def on_vllm_restart(self, resync: Callable[[], None]) -> None:
        """Register what makes a restarted vLLM serve the current policy again (a fresh
        server knows only the model it started on: no adapter, no weight-sync group)."""
        self._resyncs.append(resync)

    def restart_vllm(self, reason: str) -> None:
        """--restart-vllm-on-failure: restart the server this run started (on its current
        model_path) and run the resync hooks; VLLMGone once MAX_VLLM_RESTARTS are used up."""
        from .vllm.server import VLLMGone
        server = self.vllm
        if server is None or not self.cfg.restart_vllm_on_failure:
            raise VLLMGone(reason)
        if self.vllm_restarts >= MAX_VLLM_RESTARTS:
            raise VLLMGone(f"{reason}\n(gave up: vLLM was already restarted "
                           f"{self.vllm_restarts} times in this run)")
        self.vllm_restarts += 1
        self.results["vllm_restarts"] = self.vllm_restarts
        log.warning("%s\nrestarting vLLM (%d of at most %d, --restart-vllm-on-failure)",
                    reason, self.vllm_restarts, MAX_VLLM_RESTARTS)
        t0 = time.monotonic()
        server.restart()
        for resync in self._resyncs:
            resync()
        self._restart_s += time.monotonic() - t0
        log.warning("vLLM restarted and serves the current weights again (%.1f s)",
                    time.monotonic() - t0)

    @contextlib.contextmanager
    def vllm_guard(self) -> Iterator[None]:
        """Around the loop's calls to vLLM (sync, parity probe). With
        --restart-vllm-on-failure, an error because the server we started has exited is
        answered by a restart and a resync, which sends the current weights and so completes
        the interrupted sync; any other error propagates unchanged."""
        try:
            yield
        except Exception as exc:
            server = self.vllm
            if not self.cfg.restart_vllm_on_failure or server is None or server._proc is None:
                raise
            try:  # a killed server's socket closes as it dies: give the exit a moment
                code = server._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                raise exc from None  # vLLM runs: a real error, not a dead server
            self.restart_vllm(server._failure_message(
                f"vLLM exited with code {code} during training ({type(exc).__name__} "
                f"while talking to it)"))

    def _pop_restart_metrics(self) -> dict[str, float]:
        """`vllm/restarts` (so far in this run) and this step's `vllm/restart_s`."""
        if not self.vllm_restarts:
            return {}
        seconds, self._restart_s = self._restart_s, 0.0
        return {"vllm/restarts": float(self.vllm_restarts), "vllm/restart_s": seconds}

    def __post_init__(self) -> None:
        # Where the final checkpoint of an interrupted run may stand: SIGINT/SIGTERM wait
        # while an optimizer update runs, and the hooks record which step it belonged to.
        self._updated_step = self.start_step   # last step whose optimizer update finished
        self._in_update = False                # an update started and has not finished
        self._resumed_pending = list(self.fetcher.replay)
        self._sync_bytes = 0  # bytes of served weights written since the last step record
        self.recorder.sources.append(self._pop_sync_bytes)
        self.vllm: Any = None  # the VLLMServer this run started (start_vllm)
        self.vllm_restarts, self._restart_s = 0, 0.0
        self._resyncs: list[Callable[[], None]] = []
        self.recorder.sources.append(self._pop_restart_metrics)

        def started() -> None:
            self._in_update = True

        def finished() -> None:
            self._in_update = False
            self._updated_step = self.fetcher.in_flight_step

        guard_optimizer_updates(self.optimizer, on_start=started, on_done=finished)

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


class ParityProbe:
    """After each sync: vLLM's probe log-probs must equal the trainer's and must have moved.

    Default: vLLM scores a fixed chat sequence with `prompt_logprobs`. With `sampled=True`
    (LoRA serving) vLLM instead samples a short answer to the probe question (T=1, fixed
    seed) and the trainer scores the same tokens: on vLLM 0.32 CPU a prompt-logprobs request
    under LoRA crashes the engine when other requests share its batch, while sampling is the
    path the environment uses anyway. "Moved" is the gap between the trainer's new log-probs
    of the previous probe and what vLLM served for it before the step; with parity holding
    now, it shows vLLM moved with the trainer.
    """

    def __init__(self, run: TrainingRun, client: Any, served_model: str, *,
                 sampled: bool = False, seed: int = 1234, max_tokens: int = 16) -> None:
        from .parity import PROBE_MESSAGES, default_probe_tokens
        self.run = run
        self.model, self.client, self.served_model = run.model, client, served_model
        self.atol, self.sampled = run.cfg.parity_atol, sampled
        self.seed, self.max_tokens = seed, max_tokens
        self.tokens = default_probe_tokens(run.tokenizer)
        self.prompt = [int(t) for t in run.tokenizer.apply_chat_template(
            PROBE_MESSAGES[:1], add_generation_prompt=True, tokenize=True,
            return_dict=False)]
        self.previous = self._served()

    def _served(self) -> tuple[list[int], torch.Tensor]:
        """(probe sequence, vLLM's log-probs of its scored tokens)."""
        from .parity import vllm_probe_logprobs
        if not self.sampled:
            return self.tokens, vllm_probe_logprobs(self.client, self.tokens,
                                                    model=self.served_model)
        [completion] = self.client.completions(self.prompt, n=1, max_tokens=self.max_tokens,
                                               temperature=1.0, seed=self.seed,
                                               model=self.served_model)
        return (self.prompt + list(completion.token_ids),
                torch.tensor(completion.logprobs, dtype=torch.float32))

    def _trainer(self, tokens: list[int], n: int) -> torch.Tensor:
        """The trainer's log-probs of the last n tokens of `tokens`."""
        from .parity import trainer_probe_logprobs
        return trainer_probe_logprobs(self.model, tokens)[-n:]

    def check(self) -> dict[str, float]:
        """Parity metrics; empty when vLLM died during the probe and was restarted (the
        next sync's probe then proves the resync)."""
        metrics: dict[str, float] = {}
        with self.run.vllm_guard():
            metrics = self._check()
        return metrics

    def _check(self) -> dict[str, float]:
        from .parity import ParityError
        tokens, served = self._served()
        gap = float((self._trainer(tokens, len(served)) - served).abs().max())
        if not gap <= self.atol:  # also catches NaN
            raise ParityError(f"vLLM does not serve the trainer's weights: max |logprob diff| "
                              f"{gap:.3g} > --parity-atol {self.atol:.1g} on the probe "
                              f"({self.served_model!r}, {len(served)} tokens)")
        old_tokens, old_served = self.previous
        moved = float((self._trainer(old_tokens, len(old_served)) - old_served).abs().max())
        self.previous = (tokens, served)
        log.info("parity ok: max |logprob diff| %.2e (atol %.0e); probe moved %.2e",
                 gap, self.atol, moved)
        return {"sync/parity_max_abs": gap, "sync/probe_moved_max_abs": moved}


def start_vllm(cfg: TrainConfig, model_path: str | Path, **options: Any):
    """Start vLLM as the config says; options are VLLMServer's (LoRA, worker extension).

    The caller owns the server: prefer `TrainingRun.start_vllm`, which stops it on exit."""
    from .vllm.server import VLLMServer
    gpu = torch.cuda.is_available()
    server = VLLMServer(
        model_path, port=cfg.vllm_port, served_model_name=options.pop("served_model_name",
                                                                      cfg.served_name),
        max_model_len=cfg.max_token_len, enforce_eager=cfg.vllm_enforce_eager,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization if gpu else None,
        tensor_parallel_size=cfg.vllm_tensor_parallel_size if gpu else None,
        kv_cache_gib=None if gpu else cfg.vllm_kv_cache_gib, seed=cfg.seed,
        log_path=Path(cfg.save_path) / "vllm.log", extra_args=cfg.vllm_extra_args,
        startup_timeout=cfg.vllm_startup_timeout, dev_mode=True,
        # Sampled-token log-probs after temperature, the distribution the trainer's
        # logits / T reproduces (vLLM's default is the raw, pre-temperature one).
        logprobs_mode="processed_logprobs", **options)
    Path(cfg.save_path).mkdir(parents=True, exist_ok=True)
    server.start()
    log.info("vLLM serving %s as %r at %s (start-up %.1f s)", model_path, cfg.served_name,
             server.url, server.startup_seconds)
    return server


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank


def vllm_lora_options(cfg: TrainConfig) -> dict[str, Any]:
    """Serve the base model as 'base' and leave `served_name` to the adapter."""
    rank = next((r for r in VLLM_LORA_RANKS if r >= cfg.lora_rank), None)
    if rank is None:
        raise ValueError(f"--lora-rank {cfg.lora_rank} exceeds vLLM's largest LoRA rank 512")
    return dict(served_model_name="base", enable_lora=True, max_lora_rank=rank)


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def remove_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
