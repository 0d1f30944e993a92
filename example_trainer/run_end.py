"""How a run ends: the final checkpoint after an interruption or a failure, and the summary.

Kept apart from trainer.py's set-up and loop; both take the `TrainingRun` and read its state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .distributed import broadcast_object
from .ranks import broadcast_or_local

if TYPE_CHECKING:
    from .trainer import TrainingRun

log = logging.getLogger(__name__)


def save_final_checkpoint(run: "TrainingRun", exc: BaseException) -> Path | None:
    """On any abnormal exit: checkpoint the last whole step, with the batches taken from
    the API but not trained, unless that is already on disk. Sets `exc.summary` (the
    CLI's one-line report of an interruption)."""
    cfg = run.cfg
    if run.dist is not None:
        try:  # the final checkpoint is collective: is every rank here?
            run.dist.barrier(timeout=cfg.sync_timeout)
        except Exception as err:  # noqa: BLE001 - a rank died or hangs: no collective
            log.error("no final checkpoint: not every rank reached it (%s); resume from "
                      "the last one in %s", str(err).splitlines()[0], cfg.save_path)
            return None
    if run.in_update:
        log.error("the optimizer update was cut short by %s, so parameters may be half "
                  "updated: no final checkpoint; resume from the last one in %s",
                  type(exc).__name__, cfg.save_path)
        return None
    done = run.completed_step()
    pending = run.fetcher.untrained(done)
    if run.dist is not None:  # rank 0 knows what was taken from the API: it decides
        done, unsaved = broadcast_object(run.dist, (done, bool(pending)))
    else:
        unsaved = bool(pending)
    path: Path | None = None
    if done == run.checkpoints.last_saved_step and not unsaved:
        path = run.checkpoints.root / f"step-{done:06d}"
        what = f"checkpoint {path} (already saved)"
    elif done == run.start_step and broadcast_or_local(
            run.dist, pending == run.resumed_pending):
        what = ("no new checkpoint (nothing trained since "
                + (f"resuming from {cfg.resume})" if cfg.resume else "the start)"))
    else:
        in_flight_pending = bool(pending) and pending[0] is run.fetcher.in_flight
        rng = run.fetcher.in_flight_rng if in_flight_pending else None
        try:
            path = run.checkpoints.save(done, **run.state(), pending=pending or None,
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


def run_summary(run: "TrainingRun") -> str:
    records = run.recorder.records
    if not records:
        return "no steps were run"
    mean = lambda key: sum(r.get(key, 0.0) for r in records) / len(records)  # noqa: E731
    lines = [f"run summary ({run.cfg.mode}):",
             f"  steps            {records[-1]['step']}",
             f"  reward           first {records[0].get('train/reward_mean', 0):.3f} -> "
             f"last {records[-1].get('train/reward_mean', 0):.3f}"]
    if "eval_before" in run.results:
        lines.append(f"  held-out acc.    {run.results['eval_before']:.3f} -> "
                     f"{run.results.get('eval_after', float('nan')):.3f} "
                     f"(T={run.cfg.eval_temperature})")
    if "wall_s" in run.results:
        lines.append(f"  wall time        {run.results['wall_s']:.0f} s from the trainer's "
                     f"start to the end of the final evaluation (waiting for evaluations "
                     f"{run.results['eval_s']:.0f} s)")
    lines += [f"  mean step time   {mean('step_s'):.2f} s (train {mean('train_s'):.2f}, "
              f"sync {mean('sync_s'):.2f}, data wait {mean('data_s'):.2f})",
              f"  rejected groups  {run.fetcher.rejected_groups}",
              f"  checkpoints      {run.cfg.save_path}"]
    if run.cfg.benchmark_json:
        lines.append(f"  benchmark JSON   {run.cfg.benchmark_json}")
    return "\n".join(lines)
