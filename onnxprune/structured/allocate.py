"""Turn channel scores into a :data:`~onnxprune.channels.types.KeepPlan` (group id -> kept indices).

Two steps, each a small function: *how many* channels each group keeps (:func:`local_counts`,
:func:`global_counts`, both finished by :func:`final_count`, which enforces the limits), then
*which* ones (:func:`select`, the most important, balanced per block).

Limits, enforced for every group whatever the ratio, so no layer can collapse:
- ``max_ratio``: never remove more than this fraction of a group's channels;
- ``min_keep``: keep at least this many channels (all of them when the group is smaller);
- at least one channel per block is always kept (a group never drops to 0);
- ``round_to``: kept counts are multiples of N where a multiple fits within the limits;
  with ``columns`` (a hardware profile's ``channel_multiple``) N counts weight columns, so a
  head group keeps whole heads whose columns are a multiple of N (:func:`column_limits`);
- ``blocks``: a grouped conv / GroupNorm group keeps the same count in each contiguous block;
- windows: where a member sees only some of the group's channels (a Split or Slice output), that
  window keeps at least one channel and loses at most ``max_ratio`` of them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..channels.types import Group, KeepPlan
from ..core.errors import OnnxPruneError

_EPS = 1e-9  # absorbs float noise in C * (1 - r) (10 * (1 - 0.7) = 2.9999999999999996)


@dataclass(frozen=True)
class Limits:
    """Per-group limits (see the module docstring)."""

    max_ratio: float = 0.9
    min_keep: int = 1
    round_to: int = 1
    columns: bool = False  # round_to counts weight columns, not group channels (see column_limits)

    def __post_init__(self):
        if not 0.0 <= self.max_ratio < 1.0:
            raise OnnxPruneError(f"--max-ratio must be in [0, 1) (the most of a group that may go), got {self.max_ratio}")
        if int(self.min_keep) != self.min_keep or self.min_keep < 1:
            raise OnnxPruneError(f"--min-keep must be a positive integer, got {self.min_keep}")
        if int(self.round_to) != self.round_to or self.round_to < 1:
            raise OnnxPruneError(f"--round-to must be a positive integer, got {self.round_to}")


def lower_bound(size: int, blocks: int, limits: Limits) -> int:
    """Fewest channels a group may keep: max_ratio, min_keep and one per block, as a multiple of blocks."""
    lo = min(size, max(1, int(limits.min_keep), math.ceil(size * (1.0 - limits.max_ratio) - _EPS)))
    return math.ceil(lo / blocks) * blocks  # <= size: blocks divides size


def final_count(size: int, desired: int, blocks: int, limits: Limits) -> int:
    """The kept count nearest to ``desired`` that respects the limits.

    Within [lower_bound, size]: a multiple of lcm(blocks, round_to) when one fits (nearest; a tie
    goes to keeping more), otherwise a multiple of blocks."""
    if size % blocks:
        raise ValueError(f"group of {size} channels is not divisible into {blocks} blocks")
    lo = lower_bound(size, blocks, limits)
    want = min(max(int(desired), lo), size)
    for unit in dict.fromkeys((math.lcm(blocks, int(limits.round_to)), blocks)):
        first = math.ceil(lo / unit) * unit
        if first > size:
            continue  # no multiple of this unit fits; relax to the next
        down = max(first, (want // unit) * unit)
        up = min(size // unit * unit, down + unit if down < want else down)
        return up if (up - want) <= (want - down) else down
    return want  # unreachable: blocks always divides size


def column_limits(group: Group, limits: Limits) -> Limits:
    """``limits`` with ``round_to`` counted in weight columns, not group channels: a head group's
    channel is a whole head (``head_dim`` columns of q, k and v), so ``k`` kept heads already give
    kernel-friendly widths when ``k * head_dim`` is a multiple; rounding the head count itself to 8
    would leave an 8-head layer whole. Groups of single columns (FFN, convs) are unchanged."""
    per = [int(m.positions.counts[0]) for m in group.members if m.role in ("out", "in") and len(m.positions)]
    cols = math.gcd(*per) if per else 1
    unit = int(limits.round_to) // math.gcd(int(limits.round_to), max(cols, 1))
    return limits if unit == limits.round_to else dataclasses.replace(limits, round_to=unit)


def group_limits(group: Group, limits: Limits) -> Limits:
    """The limits one group is rounded by: :func:`column_limits` when ``limits.columns``."""
    return column_limits(group, limits) if limits.columns else limits


def windows(group: Group) -> list[np.ndarray]:
    """Channel subsets some member sees on its own (the outputs of a Split or Slice of the group's
    channels, the conv reading one of them): removing all of one would leave an empty tensor."""
    out: dict[tuple[int, ...], None] = {}
    for m in group.members:
        held = m.positions.held()
        if held.all():
            continue
        support = tuple(np.nonzero(held)[0].tolist())
        if support:
            out.setdefault(support, None)
    return [np.asarray(w, dtype=np.int64) for w in out]


def window_needs(group: Group, limits: Limits) -> list[tuple[np.ndarray, int]]:
    """Each window keeps at least one channel and at most ``max_ratio`` of it goes (as a group)."""
    return [(w, min(len(w), max(1, math.ceil(len(w) * (1.0 - limits.max_ratio) - _EPS)))) for w in windows(group)]


def select(scores: np.ndarray, keep: int, blocks: int = 1, required: Sequence[tuple[np.ndarray, int]] = ()) -> np.ndarray:
    """Sorted indices of the ``keep`` most important channels (ties keep the lower index).

    ``blocks`` > 1: ``keep / blocks`` per contiguous block. ``required``: (channels, n) pairs, the
    ``n`` best of those channels are kept first (windows of Split/Slice outputs), which may keep
    more than ``keep`` channels in all."""
    scores = np.asarray(scores, dtype=np.float64)
    size = scores.size
    if keep >= size:
        return np.arange(size)
    if blocks > 1:
        per_block, width = keep // blocks, size // blocks
        kept = []
        for b in range(blocks):
            blk = scores[b * width:(b + 1) * width]
            kept.append(np.sort(np.argsort(-blk, kind="stable")[:per_block]) + b * width)
        return np.concatenate(kept).astype(np.int64)
    order = np.argsort(-scores, kind="stable")
    chosen = np.zeros(size, dtype=bool)
    for idx, n in required:
        chosen[idx[np.argsort(-scores[idx], kind="stable")[:n]]] = True
    rest = keep - int(chosen.sum())
    if rest > 0:
        chosen[order[~chosen[order]][:rest]] = True
    return np.nonzero(chosen)[0].astype(np.int64)


def ignored_groups(groups: Iterable[Group], patterns: Sequence[str]) -> dict[int, str]:
    """Groups touching a node whose name matches one of the fnmatch ``patterns`` -> why."""
    out: dict[int, str] = {}
    if not patterns:
        return out
    for g in groups:
        names = list(dict.fromkeys(list(g.nodes) + [m.node for m in g.members]))
        for name in names:
            pat = next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)
            if pat is not None:
                out[g.id] = f"--ignore {pat!r} matches node {name!r}"
                break
    return out


def local_counts(groups: Iterable[Group], ratio: float, limits: Limits) -> dict[int, int]:
    """Same ratio everywhere: each block keeps floor(width * (1 - ratio)) channels (torch-pruning's
    ``int(C * (1 - r))``), then the limits apply."""
    out = {}
    for g in groups:
        width = g.size // g.blocks
        desired = g.blocks * math.floor(width * (1.0 - ratio) + _EPS)
        out[g.id] = final_count(g.size, desired, g.blocks, group_limits(g, limits))
    return out


def global_scores(scores: np.ndarray, self_normalized: bool) -> np.ndarray:
    """Scores made comparable across groups: divided by the group mean (unless the criterion is
    already normalized per layer, as LAMP is). An all-zero group stays zero (its channels are dead)."""
    s = np.asarray(scores, dtype=np.float64)
    if self_normalized:
        return s
    mean = float(s.mean()) if s.size else 0.0
    return s / mean if mean > 0 else s


def global_counts(groups: Sequence[Group], scores: Mapping[int, np.ndarray], ratio: float, limits: Limits,
                  *, self_normalized: bool = False) -> dict[int, int]:
    """One ranking over all channels of all groups: the ``ratio`` least important (after per-group
    normalization) go, skipping groups that reached their limit; then the limits round each count."""
    groups = list(groups)
    if not groups:
        return {}
    total = sum(g.size for g in groups)
    n_remove = total - math.floor(total * (1.0 - ratio) + _EPS)
    caps = {g.id: g.size - lower_bound(g.size, g.blocks, limits) for g in groups}
    all_scores = np.concatenate([global_scores(scores[g.id], self_normalized) for g in groups])
    owner = np.concatenate([np.full(g.size, g.id) for g in groups])
    removed = {g.id: 0 for g in groups}
    left = n_remove
    for i in np.argsort(all_scores, kind="stable"):
        if left <= 0:
            break
        gid = int(owner[i])
        if removed[gid] < caps[gid]:
            removed[gid] += 1
            left -= 1
    return {g.id: final_count(g.size, g.size - removed[g.id], g.blocks, group_limits(g, limits)) for g in groups}


def allocate(groups: Sequence[Group], scores: Mapping[int, np.ndarray], ratio: float, *, scope: str = "local",
             limits: Limits = Limits(), self_normalized: bool = False) -> KeepPlan:
    """Kept channels of every group in ``groups`` (all must have scores) at ``ratio`` removed."""
    if not 0.0 <= ratio < 1.0:
        raise OnnxPruneError(f"--ratio must be in [0, 1), got {ratio}")
    if scope == "local":
        counts = local_counts(groups, ratio, limits)
    elif scope == "global":
        counts = global_counts(groups, scores, ratio, limits, self_normalized=self_normalized)
    else:
        raise OnnxPruneError(f"--scope must be local or global, got {scope!r}")
    return {g.id: select(scores[g.id], counts[g.id], g.blocks, window_needs(g, limits)) for g in groups}
