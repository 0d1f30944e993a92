"""Batch packing: which queued groups make the next exact-size batch, and how a group splits.

Split from `queue.py` because it is pure: functions of group sizes and bodies, with no
storage, leases or HTTP, so the fairness rules (oldest first, exact size, no starvation) can be
read and tested on their own. The queue calls `plan_batch` on its in-memory index, then stores
the result.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Fields that hold one entry per sequence; a split slices all of them the same way.
PER_SEQUENCE_FIELDS = ("tokens", "masks", "scores", "advantages", "ref_logprobs",
                       "inference_logprobs", "messages", "overrides", "distill_token_ids",
                       "distill_logprobs")
# After the oldest group has been passed over by this many exact-fit batches, the next batch
# is filled oldest-first (splitting if needed), so an awkwardly sized group cannot starve.
MAX_PASSED_OVER = 2


@dataclass
class Queued:
    """Index entry of one stored group; its body stays in the database."""

    id: int
    size: int
    env_id: int | None
    passed_over: int = 0


def exact_subset(sizes: list[int], target: int) -> list[int] | None:
    """Indices of the lexicographically earliest subset of `sizes` summing to `target`.

    reach[i] is a bitset of the sums reachable with sizes[i:]; walking forward we take a group
    whenever what is left can still be made from the groups after it, which prefers the oldest.
    """
    limit = (1 << (target + 1)) - 1
    reach = [0] * (len(sizes) + 1)
    reach[-1] = 1
    for i in range(len(sizes) - 1, -1, -1):
        reach[i] = (reach[i + 1] | (reach[i + 1] << sizes[i])) & limit
    if not (reach[0] >> target) & 1:
        return None
    chosen, remaining = [], target
    for i, size in enumerate(sizes):
        if remaining == 0:
            break
        if size <= remaining and (reach[i + 1] >> (remaining - size)) & 1:
            chosen.append(i)
            remaining -= size
    return chosen


def split_group(group: dict[str, Any], k: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cut a group after its first k sequences, keeping the whole group's score statistics.

    Both parts get group_overrides {group_score_mean, group_score_std (population),
    split_of: original size} so the trainer normalises advantages over the whole group. A part
    that is split again keeps the statistics of the original group.
    """
    n = len(group["tokens"])
    stats = dict(group.get("group_overrides") or {})
    if "split_of" not in stats:
        stats.update(group_score_mean=statistics.fmean(group["scores"]),
                     group_score_std=statistics.pstdev(group["scores"]), split_of=n)
    head, tail = dict(group), dict(group)
    for name in PER_SEQUENCE_FIELDS:
        value = group.get(name)
        if isinstance(value, list) and len(value) == n:
            head[name], tail[name] = value[:k], value[k:]
    head["group_overrides"], tail["group_overrides"] = stats, dict(stats)
    return head, tail


Plan = tuple[list[Queued], list[Queued], int]


def plan_batch(queue: Sequence[Queued], target: int) -> Plan:
    """(groups to serve in order, groups passed over, cut) for a queue holding at least
    `target` sequences: the earliest exact subset, unless there is none or the oldest group
    has waited too long; then oldest first, the last group cut after `cut` sequences (0: none).
    """
    chosen = exact_subset([entry.size for entry in queue], target)
    starving = queue[0].passed_over >= MAX_PASSED_OVER
    if chosen is None or (starving and chosen[0] != 0):
        return _plan_split(queue, target)
    return _plan_exact(queue, chosen)


def _plan_exact(queue: Sequence[Queued], chosen: list[int]) -> Plan:
    """(groups to serve, groups passed over, 0): the earliest exact subset."""
    picked, last = set(chosen), chosen[-1]
    taken = [queue[i] for i in chosen]
    passed = [entry for i, entry in enumerate(queue) if i < last and i not in picked]
    return taken, passed, 0


def _plan_split(queue: Sequence[Queued], target: int) -> Plan:
    """Oldest groups whole while they fit, then the first `cut` sequences of the next."""
    taken, remaining = [], target
    for entry in queue:
        taken.append(entry)
        if entry.size >= remaining:
            return taken, [], (remaining if entry.size > remaining else 0)
        remaining -= entry.size
    raise AssertionError("queued_sequences >= target, yet the queue ran out")
