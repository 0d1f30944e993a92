"""Atomic checkpoints: a crash mid-save never leaves a half-written `step-N` behind.

Each checkpoint is written into a hidden temporary directory, flushed to disk, then renamed
into place (rename is atomic on one filesystem); `latest` is replaced the same way. Layout:

    save_path/step-000012/   model (save_pretrained: full weights, or the LoRA adapter),
                             tokenizer, trainer_state.pt (step, optimizer, scheduler, RNG),
                             pending_batches.json (only after an interruption: batches taken
                             from the API but not trained yet; a resume trains them first)
    save_path/latest         the name of the newest complete checkpoint

trainer_state.pt also holds `lease`: the last trajectory-API lease the checkpoint covers
(trained, or saved as pending), so a resume after a crash tells the API which leased batches
to forget and which to serve again (example_trainer/api.py).

`SAFE_POINTS` decides where SIGINT/SIGTERM may land: never inside an optimizer update or
between taking a batch from the API and recording it, so the final checkpoint written on an
interruption holds whole steps and no batch vanishes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .background import in_background

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
PENDING_FILE = "pending_batches.json"


# ---------------------------------------------------------------------------------------------
# Interruption: signals land only at safe points
# ---------------------------------------------------------------------------------------------

class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM. A KeyboardInterrupt, so `except Exception` in library code cannot
    swallow it; `summary` is filled in by TrainingRun.__exit__ for the CLI's last line."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.summary = ""
        super().__init__(self.name)


class SafePoints:
    """Defers SIGINT/SIGTERM while the trainer is inside a critical section.

    Raising at an arbitrary bytecode could cut an optimizer update in half (some parameters
    updated, others not) or drop a batch the API has already handed over. Inside `critical()`
    the handler only records the signal; it is raised when the outermost section ends.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self.swallow = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.swallow:
            log.warning("%s ignored: already stopping (writing the final checkpoint and "
                        "stopping child processes)", signal.Signals(signum).name)
            return
        if self.depth:
            if self.pending is None:
                log.warning("%s received: finishing the current update first",
                            signal.Signals(signum).name)
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM here (main thread only); restore the old handlers after."""
        previous = {sig: signal.signal(sig, self.handler)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def enter(self) -> None:
        self.depth += 1

    def leave(self) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0 and self.pending is not None and not self.swallow:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Signals arriving inside are raised when the block ends (normally)."""
        self.enter()
        try:
            yield
        except BaseException:
            self.depth = max(self.depth - 1, 0)  # already unwinding: no second exception
            raise
        self.leave()

    @contextlib.contextmanager
    def stopping(self) -> Iterator[None]:
        """Final clean-up: further signals are logged and ignored, so a second Ctrl-C cannot
        orphan vLLM or cut the final checkpoint short (kill -9 still can; saves are atomic)."""
        self.swallow, self.depth, self.pending = True, 0, None
        try:
            yield
        finally:
            self.swallow = False


SAFE_POINTS = SafePoints()


def guard_optimizer_updates(optimizer: torch.optim.Optimizer,
                            on_start: Callable[[], None] | None = None,
                            on_done: Callable[[], None] | None = None) -> None:
    """Make every `optimizer.step()` a critical section (no half-updated parameters);
    `on_start()` / `on_done()` run before and after each update."""
    def pre(*_: Any) -> None:
        SAFE_POINTS.enter()
        if on_start is not None:
            on_start()

    def post(*_: Any) -> None:
        if on_done is not None:
            on_done()
        SAFE_POINTS.leave()

    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old text or the new, never an empty or partial file."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(final: Path, model: torch.nn.Module, tokenizer: Any = None,
                 trainer_state: dict[str, Any] | None = None,
                 pending: list[list[dict[str, Any]]] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model (+ tokenizer, + trainer state, + untrained batches) to `final` atomically:
    build a hidden sibling directory, fsync it, rename it into place. Re-saving swaps, then
    deletes; find_checkpoint recovers the old copy if a crash lands between the two renames.
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # only when given: a model's own save_pretrained need not accept state_dict
    model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if pending:
        (tmp / PENDING_FILE).write_text(json.dumps(pending))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    install_directory(tmp, final)
    return final


def install_directory(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory into place; a re-save swaps the old copy aside
    first (`.old-NAME-PID`, which find_checkpoint falls back to) and then deletes it."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest complete one under a save_path.

    `latest` is trusted when it names a complete checkpoint. Otherwise (a crash between the
    two renames of a re-save, or a `latest` edited by hand) the newest complete `step-*` is
    used, then the previous copy a re-save set aside (`.old-step-*`); hidden `.tmp-*`
    directories are never used: they may be half written.
    """
    path = Path(path)
    if _complete(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        named = path / latest.read_text().strip()
        if _complete(named):
            return named
    candidates = sorted((p for p in path.glob("step-*") if _complete(p)), reverse=True)
    candidates += sorted((p for p in path.glob(".old-step-*") if _complete(p)), reverse=True)
    if candidates:
        log.warning("%s: 'latest' does not name a complete checkpoint; using %s", path,
                    candidates[0])
        return candidates[0]
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a save "
                            "path holding a complete step-* checkpoint: check --resume")


def load_pending_batches(checkpoint: str | Path) -> list[list[dict[str, Any]]]:
    """Batches an interrupted run took from the API but never trained (oldest first)."""
    file = Path(checkpoint) / PENDING_FILE
    return json.loads(file.read_text()) if file.is_file() else []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(root: Path) -> None:
    """Delete `.tmp-*` / `.old-*` directories left by a process that died mid-save.

    An `.old-step-N-PID` is kept while `step-N` is missing: it is then the only copy."""
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        stem, _, pid = leftover.name.rpartition("-")
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if leftover.name.startswith(".old-") and not (root / stem[len(".old-"):]).exists():
            continue
        log.info("removing %s left by an interrupted save", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


class Checkpointer:
    """Saves every `every` steps (and at the end), keeping the newest `keep`.

    With `last_in_background`, the last step's checkpoint is written in a thread while vLLM
    runs the final evaluation (nothing changes the weights any more, and the trainer's core
    is idle then): `maybe_save` returns its path at once and `wait` joins it (retrying a
    failed write once, in the caller's thread). Off where a save is collective (torchrun)."""

    last_in_background = False
    # the background write, and the step and state it writes (for a retry)
    _writer: tuple[Future, int, dict[str, Any]] | None = None

    def __init__(self, save_path: str | Path, every: int = 0, keep: int = 2, *,
                 last_in_background: bool = False) -> None:
        self.root = Path(save_path)
        self.every = every
        self.keep = max(keep, 1)
        self.last_saved_step: int | None = None
        self.on_saved: Callable[[str | None], None] | None = None  # gets the lease record
        self.last_in_background = last_in_background
        if self.root.is_dir():
            remove_stale_temporaries(self.root)

    def maybe_save(self, step: int, total_steps: int, **state: Any) -> Path | None:
        """`step` counts completed steps; saves on the interval and after the last step
        (in the background with `last_in_background`: the path exists after `wait`)."""
        self.wait()  # a background write pending: `last_saved_step` is known after it
        due = step == total_steps or (self.every and step % self.every == 0)
        if not due or step == self.last_saved_step:
            return None
        if step == total_steps and self.last_in_background:
            # the RNG state of the step boundary, not of whenever the thread gets to it
            state = {**state, "rng": state.get("rng") or rng_state()}
            self._writer = (in_background(lambda: self._save(step, **state),
                                          "final-checkpoint"), step, state)
            return self.root / f"step-{step:06d}"
        return self.save(step, **state)

    def wait(self) -> None:
        """Join a checkpoint being written in the background. A failed write is logged and
        tried once more here; a second failure is raised."""
        pending, self._writer = self._writer, None
        if pending is None:
            return
        writer, step, state = pending
        if not writer.done():
            log.info("waiting for the final checkpoint to be written")
        try:
            writer.result()
        except Exception as err:
            log.error("writing checkpoint step-%06d failed (%s: %s); trying once more",
                      step, type(err).__name__, err)
            self._save(step, **state)

    def save(self, step: int, **state: Any) -> Path:
        """Write checkpoint `step` now, after any background write (so checkpoints land in
        step order); `state` as `_save` takes it."""
        self.wait()
        return self._save(step, **state)

    def _save(self, step: int, *, model: torch.nn.Module, tokenizer: Any = None,
              optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
              extra: dict[str, Any] | None = None,
              pending: list[list[dict[str, Any]]] | None = None,
              rng: dict[str, Any] | None = None, lease: str | None = None) -> Path:
        """`pending`: batches taken from the API but not trained (written next to the state);
        `rng`: the RNG state at the step boundary when it has moved on since; `lease`: the
        last API lease this checkpoint covers (passed to `on_saved` once it is on disk)."""
        state = {"step": step, "optimizer": optimizer.state_dict() if optimizer else None,
                 "scheduler": scheduler.state_dict() if scheduler else None,
                 "rng": rng or rng_state(), "extra": extra or {}, "lease": lease}
        final = save_weights(self.root / f"step-{step:06d}", model, tokenizer, state, pending)
        write_text_atomic(self.root / "latest", final.name)
        self.last_saved_step = step
        self._prune()
        log.info("saved checkpoint %s", final)
        if self.on_saved is not None:
            self.on_saved(lease)
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        latest = (self.root / "latest").read_text().strip() if (self.root / "latest").is_file() \
            else None
        steps = [p for p in steps if p.name != latest] + [p for p in steps if p.name == latest]
        for old in steps[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(checkpoint: str | Path, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns the saved state."""
    state = torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", checkpoint, state["step"])
    return state
