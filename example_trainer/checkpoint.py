"""Atomic checkpoints: a crash mid-save never leaves a half-written `step-N` behind.

Each checkpoint is written into a hidden temporary directory, flushed to disk, then renamed
into place (rename is atomic on one filesystem); `latest` is replaced the same way. Layout:

    save_path/step-000012/   model (save_pretrained: full weights, or the LoRA adapter),
                             tokenizer, trainer_state.pt (step, optimizer, scheduler, RNG)
    save_path/latest         the name of the newest complete checkpoint
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
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
                 trainer_state: dict[str, Any] | None = None) -> Path:
    """Write model (+ tokenizer, + trainer state) to `final` atomically: build a hidden
    sibling directory, fsync it, rename it into place. Re-saving swaps, then deletes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest one under a save_path."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if (path / "latest").is_file():
        return path / (path / "latest").read_text().strip()
    raise FileNotFoundError(f"{path} is neither a checkpoint (no {STATE_FILE}) nor a save "
                            "path with a 'latest' checkpoint")


class Checkpointer:
    """Saves every `every` steps (and at the end), keeping the newest `keep`."""

    def __init__(self, save_path: str | Path, every: int = 0, keep: int = 2) -> None:
        self.root = Path(save_path)
        self.every = every
        self.keep = max(keep, 1)
        self.last_saved_step: int | None = None

    def maybe_save(self, step: int, total_steps: int, **state: Any) -> Path | None:
        """`step` counts completed steps; saves on the interval and after the last step."""
        due = step == total_steps or (self.every and step % self.every == 0)
        if due and step != self.last_saved_step:
            return self.save(step, **state)
        return None

    def save(self, step: int, *, model: torch.nn.Module, tokenizer: Any = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             extra: dict[str, Any] | None = None) -> Path:
        state = {"step": step, "optimizer": optimizer.state_dict() if optimizer else None,
                 "scheduler": scheduler.state_dict() if scheduler else None,
                 "rng": rng_state(), "extra": extra or {}}
        final = save_weights(self.root / f"step-{step:06d}", model, tokenizer, state)
        write_text_atomic(self.root / "latest", final.name)
        self.last_saved_step = step
        self._prune()
        log.info("saved checkpoint %s", final)
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
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
