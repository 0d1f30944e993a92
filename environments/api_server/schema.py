"""Request bodies of the trajectory API and the checks a scored group must pass.

The models mirror Atropos' run-api JSON (atroposlib 0.4.0); `check_group` is the validation
pydantic cannot express (lengths that must line up, mask values, finite numbers, the trainer's
limits), so the trainer never sees a group it cannot train on. Nothing here knows about HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

# Per-token float fields that, when present, must line up with `tokens`.
PER_TOKEN_FLOAT_FIELDS = ("advantages", "ref_logprobs", "inference_logprobs")
MASK_IGNORE = -100
# Token ids above int32 belong to no vocabulary, and past int64 the trainer's tensors overflow.
MAX_TOKEN_ID = 2**31 - 1


class TrainerRegistration(BaseModel):
    """POST /register: the trainer's batch shape and run metadata."""

    model_config = ConfigDict(extra="allow")
    batch_size: int = Field(gt=0)
    max_token_len: int = Field(gt=0)
    wandb_group: str | None = None
    wandb_project: str | None = None
    checkpoint_dir: str = ""
    save_checkpoint_interval: int = 0
    starting_step: int = Field(default=0, ge=0)
    num_steps: int = 0
    # This project's extension (Atropos trainers send neither): batches are leased until the
    # trainer commits them; lease_claim {"keep": id, "commit": id} names the leases of an
    # earlier registration this trainer still holds / has checkpointed (queue.py).
    leases: bool = False
    lease_claim: dict[str, str | None] | None = None


class EnvRegistration(BaseModel):
    """POST /register-env: one environment worker announcing itself."""

    model_config = ConfigDict(extra="allow")
    max_token_length: int
    desired_name: str
    weight: float = Field(default=1.0, ge=0)
    group_size: int = Field(gt=0)
    min_batch_allocation: float | None = None


class WeightVersion(BaseModel):
    """POST /weight_version: the trainer announces which weights vLLM now serves."""

    version: StrictInt = Field(ge=0)


class LeaseAck(BaseModel):
    """POST /batch/ack body: leases up to `ack` are trained, up to `commit` checkpointed."""

    ack: str | None = None
    commit: str | None = None


class EnvRef(BaseModel):
    """POST /disconnect-env body."""

    env_id: StrictInt


class ScoredData(BaseModel):
    """One scored group as environments post it; unknown fields are kept and passed on."""

    model_config = ConfigDict(extra="allow")
    tokens: list[list[StrictInt]]
    masks: list[list[StrictInt]]
    scores: list[StrictFloat]
    advantages: list[list[StrictFloat]] | None = None
    ref_logprobs: list[list[StrictFloat]] | None = None
    inference_logprobs: list[list[StrictFloat]] | None = None
    messages: list[Any] | None = None
    generation_params: dict[str, Any] | None = None
    overrides: list[dict[str, Any]] | None = None
    group_overrides: dict[str, Any] | None = None
    env_id: StrictInt | None = None
    # atroposlib 0.4.0 fields this trainer does not use; kept, and null when absent, so every
    # /batch item carries them as run-api's do.
    images: Any = None
    distill_token_ids: list[Any] | None = None
    distill_logprobs: list[Any] | None = None


class GroupError(ValueError):
    """A post that must not enter the queue (HTTP 422); the message names field and index."""


def _first_bad_float(row: list[float]) -> int | None:
    if all(map(math.isfinite, row)):
        return None
    return next(i for i, value in enumerate(row) if not math.isfinite(value))


def _non_finite_path(value: Any, path: str) -> str | None:
    """Where a NaN/inf hides in free-form JSON; it would make /batch fail to serialise."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = ((f"{path}.{key}", item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for sub_path, item in items:
        found = _non_finite_path(item, sub_path)
        if found:
            return found
    return None


def _check_sequence(i: int, tokens: list[int], mask: list[int],
                    max_token_len: int | None) -> None:
    """One sequence: non-empty, within the trainer's length, valid ids, a mask it can use."""
    if not tokens:
        raise GroupError(f"tokens[{i}] is empty")
    if max_token_len is not None and len(tokens) > max_token_len:
        raise GroupError(f"tokens[{i}] has {len(tokens)} tokens, more than the trainer's "
                         f"max_token_len {max_token_len}")
    if len(mask) != len(tokens):
        raise GroupError(f"masks[{i}] has {len(mask)} entries but tokens[{i}] has "
                         f"{len(tokens)}")
    if min(tokens) < 0:
        t = next(t for t, tok in enumerate(tokens) if tok < 0)
        raise GroupError(f"tokens[{i}][{t}] is a negative token id ({tokens[t]})")
    if max(tokens) > MAX_TOKEN_ID:
        t = next(t for t, tok in enumerate(tokens) if tok > MAX_TOKEN_ID)
        raise GroupError(f"tokens[{i}][{t}] is {tokens[t]}, not a token id (ids are "
                         f"below 2**31; the trainer checks its own vocabulary size)")
    bad = next((t for t, (tok, m) in enumerate(zip(tokens, mask))
                if m != MASK_IGNORE and m != tok), None)
    if bad is not None:
        raise GroupError(f"masks[{i}][{bad}] is {mask[bad]}; it must be {MASK_IGNORE} "
                         f"(prompt) or the token id {tokens[bad]} (trained)")
    if mask.count(MASK_IGNORE) == len(mask):
        raise GroupError(f"masks[{i}] has no trained token (every entry is {MASK_IGNORE}): "
                         f"sequence {i} has nothing to learn from")


def check_group(group: ScoredData, *, batch_size: int | None, max_token_len: int | None,
                env_ids: Collection[int]) -> None:
    """Raise GroupError for the first inconsistency; the trainer must never see a bad group."""
    n = len(group.tokens)
    if n == 0:
        raise GroupError("tokens is empty: a group needs at least one sequence")
    for name in ("masks", "scores"):
        if len(getattr(group, name)) != n:
            raise GroupError(f"{name} has {len(getattr(group, name))} entries but tokens has {n}")
    if batch_size is not None and n > batch_size:
        raise GroupError(f"tokens holds a group of {n} sequences, more than the trainer's "
                         f"batch_size {batch_size}: it can never fit in a batch")
    for i, (tokens, mask) in enumerate(zip(group.tokens, group.masks)):
        _check_sequence(i, tokens, mask, max_token_len)
    bad = _first_bad_float(group.scores)
    if bad is not None:
        raise GroupError(f"scores[{bad}] is not finite ({group.scores[bad]})")
    for name in PER_TOKEN_FLOAT_FIELDS:
        rows = getattr(group, name)
        if rows is None:
            continue
        if len(rows) != n:
            raise GroupError(f"{name} has {len(rows)} entries but tokens has {n}")
        for i, (row, tokens) in enumerate(zip(rows, group.tokens)):
            if len(row) != len(tokens):
                raise GroupError(f"{name}[{i}] has {len(row)} entries but tokens[{i}] has "
                                 f"{len(tokens)}")
            bad = _first_bad_float(row)
            if bad is not None:
                raise GroupError(f"{name}[{i}][{bad}] is not finite ({row[bad]})")
    if group.overrides is not None and len(group.overrides) != n:
        raise GroupError(f"overrides has {len(group.overrides)} entries but tokens has {n}")
    if group.env_id is not None and group.env_id not in env_ids:
        raise GroupError(f"env_id {group.env_id} is not a registered environment "
                         f"(registered: {sorted(env_ids)}); call /register-env first")
    free_form = {"messages": group.messages, "generation_params": group.generation_params,
                 "overrides": group.overrides, "group_overrides": group.group_overrides,
                 "images": group.images, "distill_token_ids": group.distill_token_ids,
                 "distill_logprobs": group.distill_logprobs,
                 **(group.model_extra or {})}
    for name, value in free_form.items():
        path = _non_finite_path(value, name)
        if path:
            raise GroupError(f"{path} is not finite: JSON cannot carry NaN or inf")
