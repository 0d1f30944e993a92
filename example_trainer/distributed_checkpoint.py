"""Sharded checkpoints (torch.distributed.checkpoint, DCP) that resume at any world size.

Layout, beside checkpoint.py's single-process one and written with the same conventions (a
hidden temporary directory, fsynced, renamed into place; `latest` replaced atomically;
`find_checkpoint`, `--keep-checkpoints` pruning and leftover clean-up work unchanged):

    save_path/step-000012/   dcp/                 model and optimizer, one file per rank that
                                                  wrote it plus DCP's .metadata (FQN keys)
                             trainer_state.pt     step, scheduler, RNG (rank 0's), extra,
                                                  "format": "dcp", "world_size": N;
                                                  "optimizer" is None (it is in dcp/)
                             tokenizer files, config.json, pending_batches.json (as today)

DCP stores each tensor with its global shape, so `load_checkpoint` reshards on load: a
checkpoint written by 2 ranks loads into 1 process (no process group needed) or 4 ranks,
and one written by a single process (`ShardedCheckpointer` with `dist=None`, i.e. "DCP at
world size 1 when asked") loads into 2 ranks. `load_checkpoint` also reads today's
single-process checkpoints (trainer_state.pt with an index-keyed optimizer state) into a
sharded run: the weights come from `load_model(resume_from=...)` before sharding, as for one
process; the optimizer state is keyed by parameter name and sharded here.

Needs a filesystem all ranks see (one machine, or a shared one for several nodes).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (PENDING_FILE, STATE_FILE, Checkpointer, _fsync_tree,
                         install_directory, rng_state, set_rng_state, write_text_atomic)
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
FORMAT = "dcp"


def _barrier(dist: Any) -> None:
    if dist is not None:
        dist.barrier()


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter name (sharded tensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


class ShardedCheckpointer(Checkpointer):
    """`Checkpointer` whose `save` writes DCP shards from every rank. Call `save` (or
    `maybe_save`) on every rank: it is collective. Only rank 0 writes the small files,
    renames, prunes and cleans up leftovers. `dist=None`: one process, no process group."""

    def __init__(self, save_path: str | Path, dist: Any = None, every: int = 0,
                 keep: int = 2) -> None:
        self.dist = dist
        if dist is None or dist.is_main:
            super().__init__(save_path, every, keep)
        else:  # the same settings, without touching rank 0's directories
            self.root, self.every, self.keep = Path(save_path), every, max(keep, 1)
            self.last_saved_step = None
            self.on_saved = None

    def _is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def _save(self, step: int, *, model: torch.nn.Module, tokenizer: Any = None,
              optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
              extra: dict[str, Any] | None = None,
              pending: list[list[dict[str, Any]]] | None = None,
              rng: dict[str, Any] | None = None, lease: str | None = None) -> Path:
        """Collective. The arguments are `Checkpointer._save`'s; only rank 0's `pending`,
        `rng` and `lease` are written (rank 0 alone talks to the API)."""
        import torch.distributed.checkpoint as dcp
        from .distributed import broadcast_object
        final = self.root / f"step-{step:06d}"
        tmp: Path | None = None
        if self._is_main():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        if self.dist is not None:  # every rank writes into rank 0's temporary directory
            tmp = Path(broadcast_object(self.dist, str(tmp)))
        dcp.save(sharded_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
        if self._is_main():
            state = {"step": step, "optimizer": None,
                     "scheduler": scheduler.state_dict() if scheduler else None,
                     "rng": rng or rng_state(), "extra": extra or {}, "lease": lease,
                     "format": FORMAT,
                     "world_size": self.dist.world_size if self.dist else 1}
            config = getattr(model, "config", None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if pending:
                import json
                (tmp / PENDING_FILE).write_text(json.dumps(pending))
            torch.save(state, tmp / STATE_FILE)
            _fsync_tree(tmp)
            install_directory(tmp, final)
            write_text_atomic(self.root / "latest", final.name)
            self._prune()
            log.info("saved sharded checkpoint %s", final)
        self.last_saved_step = step
        _barrier(self.dist)  # no rank goes on before the checkpoint exists
        if self._is_main() and self.on_saved is not None:
            self.on_saved(lease)
        return final


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _named_trainable(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters in optimizer order (build_optimizer keeps the
    model's order and drops frozen ones)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _by_name(saved: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """A single-process optimizer state dict (indexed like the optimizer's parameters) keyed
    by parameter name, as torch.distributed.checkpoint.state_dict expects. fp32 masters
    (`master`, kept by MasterWeightsOptimizer and adamw_cpu) are dropped: FSDP's fp32
    shards are the masters."""
    names = _named_trainable(model)
    groups, index = [], 0
    for group in saved["param_groups"]:
        ids = group["params"]
        groups.append({**group, "params": names[index:index + len(ids)]})
        index += len(ids)
    if index != len(names):
        raise ValueError(f"the checkpoint's optimizer holds {index} parameters, the model "
                         f"{len(names)} trainable ones: not the same model/LoRA settings")
    position = {pid: i for i, pid in enumerate(p for g in saved["param_groups"]
                                              for p in g["params"])}
    state = {names[position[pid]]: {k: v for k, v in entry.items() if k != "master"}
             for pid, entry in saved["state"].items()}
    return {"state": state, "param_groups": groups}


def load_checkpoint(checkpoint: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
                    ) -> dict[str, Any]:
    """Restore a checkpoint of either format into `model` (sharded or not) and `optimizer`;
    scheduler and RNG too. Returns the saved trainer state (its "step" is where to go on).

    Sharded (DCP) checkpoints restore the weights as well; a single-process checkpoint
    restores optimizer, scheduler and RNG only (its weights are loaded with the model).
    Every rank calls this; without a process group it runs in this process alone.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict,
                                                         set_state_dict)
    checkpoint = Path(checkpoint)
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    if is_sharded_checkpoint(checkpoint):
        import torch.distributed.checkpoint as dcp
        target = sharded_state(model, optimizer)  # destination tensors, resharded by DCP
        dcp.load(target, checkpoint_id=str(checkpoint / DCP_DIR))
        if optimizer is None:
            set_model_state_dict(model, target["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=target["model"],
                           optim_state_dict=target["optim"])
    elif optimizer is not None and state.get("optimizer") is not None:
        set_optimizer_state_dict(model, optimizer, _by_name(state["optimizer"], model),
                                 options=StateDictOptions(full_state_dict=True))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    log.info("resumed from %s (%s, written by %d rank(s)) at step %d", checkpoint,
             "sharded" if is_sharded_checkpoint(checkpoint) else "single-process",
             state.get("world_size", 1), state["step"])
    return state


def check_single_process_resume(cfg: TrainConfig, model: torch.nn.Module,
                                checkpoint: Path) -> None:
    """A sharded checkpoint resumes in one process through torch's own optimizer state dict
    (keyed by parameter name): that needs a torch optimizer over fp32 parameters, not one
    of this project's wrappers (fp32 masters of bf16 weights, adamw_cpu's offload)."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if cfg.optimizer != "adamw" or low:
        raise ConfigError(
            f"{checkpoint} is a sharded checkpoint (written under torchrun); one process "
            "resumes it with --optimizer adamw in fp32 only (here --optimizer "
            f"{cfg.optimizer}{', ' + '/'.join(low) + ' weights' if low else ''}): pass "
            "--optimizer adamw --dtype float32, or resume under torchrun (./run.sh --nproc N)")
