"""Kwon et al.'s mask rearrangement (2022) for ``--criterion fisher``.

The diagonal Fisher scores each head (FFN column) alone: removing two heads is charged the sum of
their costs. Within a layer the cost of removing a set ``R`` is, to second order,
``1_R^T F 1_R`` with ``F`` the layer's whole Fisher matrix, whose off-diagonal terms say how the
removals add up: two heads whose effects on the output cancel cost less together than apart, two
that pile up cost more. Kwon et al. keep the number of removals per layer that the global
(diagonal) choice gave, and choose *which* ones greedily on ``F``: the first pick is the smallest
diagonal entry, each next one the channel that adds least to the cost of those already picked.

``F = P^T P`` with ``P`` the per-batch mask gradients (:func:`~.importance.fisher_channel_gradients`),
so the greedy step never builds ``F``: the cost added by channel ``c`` is
``F[c, c] + 2 p_c . s`` with ``s`` the sum of the picked channels' gradient columns. Each consumer is
weighted by the inverse of its mean diagonal, as :func:`~.importance.aggregate` does for the scores.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from ..channels.types import Group
from .importance import ScoreInputs, fisher_channel_gradients


def rearranged(gradients: np.ndarray, keep: int) -> np.ndarray:
    """Sorted channels to keep so that the removed ones minimise ``1_R^T P^T P 1_R``, chosen greedily
    (``gradients`` is ``P``, ``[rows, channels]``); ``keep`` channels stay."""
    p = np.asarray(gradients, dtype=np.float64)
    size = p.shape[1]
    keep = int(min(max(keep, 0), size))
    diag = np.square(p).sum(0)
    picked = np.zeros(size, dtype=bool)
    s = np.zeros(p.shape[0])
    for _ in range(size - keep):
        added = diag + 2.0 * (s @ p)
        added[picked] = np.inf
        c = int(np.argmin(added))
        picked[c] = True
        s += p[:, c]
    return np.flatnonzero(~picked)


def layer_gradients(group: Group, inp: ScoreInputs) -> np.ndarray | None:
    """The group's ``P`` (rows of every consumer stacked, each scaled by ``1/sqrt`` of its mean
    diagonal), or None when no consumer has mask gradients."""
    rows = []
    for per_channel, cov in fisher_channel_gradients(group, inp):
        diag = np.square(per_channel).sum(0)
        held = diag if cov is None else diag[cov]
        mean = float(held.mean()) if held.size else 0.0
        if np.isfinite(mean) and mean > 0:
            rows.append(per_channel / np.sqrt(mean))
    return np.concatenate(rows) if rows else None


def rearrange_plan(groups: Iterable[Group], plan: Mapping[int, np.ndarray], inp: ScoreInputs) -> dict[int, np.ndarray]:
    """For every group the plan cuts, the kept channels re-chosen on its whole Fisher matrix (the
    same number kept); only the groups whose choice changed."""
    changed = {}
    for g in groups:
        kept = np.asarray(plan[g.id])
        if len(kept) >= g.size:
            continue
        p = layer_gradients(g, inp)
        if p is None:
            continue
        new = rearranged(p, len(kept))
        if not np.array_equal(np.sort(kept), new):
            changed[g.id] = new
    return changed
