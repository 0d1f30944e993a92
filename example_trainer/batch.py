"""Scored groups (Atropos ScoredData dicts) -> padded training tensors.

Alignment: the model's logits at position t predict token t+1, so every per-token tensor here
is over *targets*, `tokens[1:]`, and has length T-1. Atropos aligns `masks`,
`inference_logprobs`, `ref_logprobs` and per-token `advantages` with `tokens`, so each is
shifted by one the same way. A position is trained when its mask is not -100.

Missing inference log-probs are NaN in `old_logprobs`; the step replaces them with the
trainer's own detached log-probs (ratio 1, i.e. on-policy), so a group from an environment
that does not report log-probs still trains.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Iterator, Sequence

import torch

from .loss import group_advantages

log = logging.getLogger(__name__)


class MalformedGroup(ValueError):
    """A scored group that cannot be trained on; the message names the field and index."""


@dataclass
class Batch:
    input_ids: torch.Tensor        # (B, T) long, right-padded
    attention_mask: torch.Tensor   # (B, T) long
    loss_mask: torch.Tensor        # (B, T-1) float, 1 on trained targets
    advantages: torch.Tensor       # (B, T-1) float
    old_logprobs: torch.Tensor     # (B, T-1) float, NaN where the environment gave none
    ref_logprobs: torch.Tensor | None  # (B, T-1) float or None
    temperatures: torch.Tensor     # (B,) float
    scores: torch.Tensor           # (B,) float

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Trained (masked-in) target tokens."""
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device)
                                for f in fields(self) if getattr(self, f.name) is not None})

    @property
    def lengths(self) -> list[int]:
        """Tokens per sequence (right padding: the attention mask's row sums)."""
        return self.attention_mask.sum(dim=1).tolist()

    def rows(self, rows: slice | list[int]) -> "Batch":
        """These sequences, trimmed to their own longest one (at least 2 tokens)."""
        index = rows if isinstance(rows, slice) else torch.tensor(rows, dtype=torch.long)
        length = max(int(self.attention_mask[index].sum(dim=1).max().item()), 2)
        return replace(self, **{f.name: _trim(f.name, getattr(self, f.name), index, length)
                                for f in fields(self)})

    def micro_batches(self, size: int) -> Iterator["Batch"]:
        """Slices of `size` sequences in batch order, each trimmed to its longest sequence."""
        for start in range(0, self.size, size):
            yield self.rows(slice(start, start + size))

    def token_micro_batches(self, max_tokens: int) -> Iterator["Batch"]:
        """Micro-batches of at most `max_tokens` padded tokens each (see `plan_by_tokens`)."""
        for rows in plan_by_tokens(self.lengths, max_tokens):
            yield self.rows(rows)


def plan_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices of micro-batches whose padded size (rows x longest row) fits `max_tokens`.

    Sequences are taken longest first (ties in batch order, so the plan is deterministic):
    neighbours then have similar lengths, which wastes less padding than batch order when
    completion lengths vary, and the largest micro-batch comes first, so a budget that is too
    big fails on the first micro-batch rather than mid-step. Greedy filling of the sorted
    order gives the fewest micro-batches of any split into runs of it. A sequence longer than
    `max_tokens` forms a micro-batch of its own. Indices inside a micro-batch are ascending.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    for i in order:
        current = plan[-1] if plan else None
        # Sorted longest first, so a micro-batch pads to the length of its first member.
        if current and (len(current) + 1) * lengths[current[0]] <= max_tokens:
            current.append(i)
        else:
            plan.append([i])
    return [sorted(rows) for rows in plan]


_TOKEN_FIELDS = ("input_ids", "attention_mask")  # (B, T); other 2-D fields are (B, T-1)


def _trim(name: str, t: torch.Tensor | None, rows: slice | torch.Tensor,
          length: int) -> torch.Tensor | None:
    if t is None or t.dim() == 1:
        return None if t is None else t[rows]
    return t[rows, : length if name in _TOKEN_FIELDS else length - 1]


def validate_group(group: dict[str, Any], vocab_size: int | None = None,
                   max_token_len: int | None = None) -> None:
    """Raise MalformedGroup naming the field and index of the first problem."""
    tokens = group.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise MalformedGroup("tokens must be a non-empty list of token lists")
    n = len(tokens)
    for name in ("masks", "scores"):
        if not isinstance(group.get(name), list) or len(group[name]) != n:
            raise MalformedGroup(f"{name} must have one entry per sequence ({n})")
    for name in ("advantages", "ref_logprobs", "inference_logprobs", "overrides"):
        value = group.get(name)
        if value is not None and (not isinstance(value, list) or len(value) != n):
            raise MalformedGroup(f"{name} must have one entry per sequence ({n})")
    for i, seq in enumerate(tokens):
        if not seq or not all(isinstance(t, int) and t >= 0 for t in seq):
            raise MalformedGroup(f"tokens[{i}] must be a non-empty list of ids >= 0")
        if vocab_size is not None and max(seq) >= vocab_size:
            raise MalformedGroup(f"tokens[{i}] holds id {max(seq)} >= vocabulary size "
                                 f"{vocab_size}")
        if max_token_len is not None and len(seq) > max_token_len:
            raise MalformedGroup(f"tokens[{i}] has {len(seq)} tokens > max_token_len "
                                 f"{max_token_len}")
        if len(group["masks"][i]) != len(seq):
            raise MalformedGroup(f"masks[{i}] has {len(group['masks'][i])} entries but "
                                 f"tokens[{i}] has {len(seq)}")
        if not isinstance(group["scores"][i], (int, float)) or not math.isfinite(
                group["scores"][i]):
            raise MalformedGroup(f"scores[{i}] is not a finite number: "
                                 f"{group['scores'][i]!r}")
        for name in ("advantages", "ref_logprobs", "inference_logprobs"):
            row = (group.get(name) or [None] * n)[i]
            if row is not None and (len(row) != len(seq) or not all(
                    isinstance(x, (int, float)) and math.isfinite(x) for x in row)):
                raise MalformedGroup(f"{name}[{i}] must be {len(seq)} finite numbers")


def _temperature(group: dict[str, Any], i: int) -> float:
    """Per-sample override > group generation_params > group_overrides > 1.0."""
    for source in (((group.get("overrides") or [None] * (i + 1))[i] or {}),
                   group.get("generation_params") or {},
                   group.get("group_overrides") or {}):
        if source.get("temperature") is not None:
            return float(source["temperature"])
    return 1.0


def collate_groups(groups: list[dict[str, Any]], *, pad_id: int, std_norm: bool = True,
                   vocab_size: int | None = None, max_token_len: int | None = None,
                   rejected: list[str] | None = None) -> Batch | None:
    """Pad and align a list of scored groups; malformed groups are logged and skipped.

    Each skipped group's reason is appended to `rejected` so the caller can count it.
    Returns None when no group was usable.
    """
    rows: list[dict[str, Any]] = []
    for g_index, group in enumerate(groups):
        try:
            validate_group(group, vocab_size, max_token_len)
        except MalformedGroup as err:
            log.error("rejected malformed group %d of the batch: %s", g_index, err)
            if rejected is not None:
                rejected.append(str(err))
            continue
        rows.extend(_group_rows(group, std_norm))
    if not rows:
        return None
    B = len(rows)
    T = max(len(r["tokens"]) for r in rows)
    T = max(T, 2)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T - 1))
    advantages = torch.zeros((B, T - 1))
    old = torch.full((B, T - 1), float("nan"))
    have_ref = all(r["ref"] is not None for r in rows)
    ref = torch.zeros((B, T - 1)) if have_ref else None
    for b, r in enumerate(rows):
        n = len(r["tokens"])
        input_ids[b, :n] = torch.tensor(r["tokens"])
        attention_mask[b, :n] = 1
        loss_mask[b, : n - 1] = torch.tensor([m != -100 for m in r["masks"][1:]],
                                             dtype=torch.float)
        advantages[b, : n - 1] = torch.as_tensor(r["adv"][1:] if isinstance(r["adv"], list)
                                                 else [r["adv"]] * (n - 1))
        if r["old"] is not None:
            old[b, : n - 1] = torch.tensor(r["old"][1:])
        if ref is not None:
            ref[b, : n - 1] = torch.tensor(r["ref"][1:])
    advantages *= loss_mask
    return Batch(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                 advantages=advantages, old_logprobs=old, ref_logprobs=ref,
                 temperatures=torch.tensor([r["temp"] for r in rows]),
                 scores=torch.tensor([r["score"] for r in rows], dtype=torch.float))


def _group_rows(group: dict[str, Any], std_norm: bool) -> list[dict[str, Any]]:
    """One dict per sequence with its advantage (list per token or a float)."""
    scores = torch.tensor([float(s) for s in group["scores"]])
    stats = group.get("group_overrides") or {}
    seq_adv = group_advantages(scores, std_norm=std_norm, mean=stats.get("group_score_mean"),
                               std=stats.get("group_score_std")).tolist()
    n = len(group["tokens"])
    overrides = group.get("overrides") or [None] * n
    rows = []
    for i in range(n):
        adv: float | list[float] = (group["advantages"][i] if group.get("advantages")
                                    else seq_adv[i])
        if (overrides[i] or {}).get("set_advantage_to_zero"):
            adv = 0.0
        rows.append({"tokens": group["tokens"][i], "masks": group["masks"][i], "adv": adv,
                     "old": (group.get("inference_logprobs") or [None] * n)[i],
                     "ref": (group.get("ref_logprobs") or [None] * n)[i],
                     "temp": _temperature(group, i), "score": float(group["scores"][i])})
    return rows
