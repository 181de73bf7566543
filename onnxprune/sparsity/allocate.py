"""How many weights each layer loses, and which: one ranking across layers or one per layer.

- ``global``: prune the ``round(sparsity * total)`` lowest scores over all prunable weights
  (Global Magnitude Pruning with ``|w|``). Achieved sparsity is the target within one weight.
- ``layer``: prune ``round(sparsity * n_l)`` in every layer: the target within one weight per layer.
- ``global`` with ``min_threshold`` (MT, Gupta et al., "Is Complexity Required for Neural Network
  Pruning? A Case Study on Global Magnitude Pruning"): every layer keeps at least
  ``ceil(min_threshold * n_l)`` weights. Layers that would fall below the floor stop at it and the
  global ranking continues into the other layers, so their sparsities rise until the global target
  is met exactly and no layer collapses.

Ties are broken deterministically: by layer order, then by flat index. Selection is by partition
(O(n)), not by sorting, so ResNet-50-sized models prune in well under a second.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..core.errors import OnnxPruneError


def floors(sizes: Sequence[int], min_threshold: float) -> list[int]:
    """Minimum kept weights per layer for the MT floor ``min_threshold`` (fraction kept)."""
    return [min(n, math.ceil(min_threshold * n - 1e-9)) if min_threshold > 0 else 0 for n in sizes]


def lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the ``k`` lowest entries of the flat array ``scores``; among equal scores the lowest
    positions are taken first. O(n) (a partition, not a sort)."""
    n = scores.size
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    t = np.partition(scores, k - 1)[k - 1]
    mask = scores < t
    missing = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(scores == t)[:missing]] = True
    return mask


def global_masks(scores: Sequence[np.ndarray], sparsity: float, min_threshold: float = 0.0) -> list[np.ndarray]:
    """Keep-masks (True = kept) from one ranking across all layers, honouring the MT floor."""
    sizes = [int(s.size) for s in scores]
    total = sum(sizes)
    k = int(round(sparsity * total))
    caps = [n - f for n, f in zip(sizes, floors(sizes, min_threshold))]  # most each layer may lose
    if k > sum(caps):
        raise OnnxPruneError(
            f"sparsity {sparsity:g} cannot be reached while every layer keeps at least {min_threshold:g} of its "
            f"weights (at most {sum(caps) / max(total, 1):.4f}); lower --sparsity or --min-threshold")
    flats = [s.reshape(-1) for s in scores]
    # MT: a layer may only lose its `cap` lowest; the global ranking runs over what is left
    allowed = [None if cap == n else lowest(f, cap) for f, cap, n in zip(flats, caps, sizes)]
    return [~m.reshape(s.shape) for m, s in zip(lowest_across(flats, allowed, k), scores)]


def lowest_across(flats: Sequence[np.ndarray], allowed: Sequence[np.ndarray | None], k: int) -> list[np.ndarray]:
    """Per-layer bool masks of the ``k`` lowest scores among every layer's ``allowed`` entries (None:
    all), ties going to earlier layers, then lower positions: :func:`lowest` on the concatenation,
    but only the threshold search copies the scores (a large model's scores are gigabytes)."""
    pool = np.concatenate([f if a is None else f[a] for f, a in zip(flats, allowed)]) if flats else np.zeros(0)
    if k <= 0 or k >= pool.size:
        fill = k > 0
        return [np.full(f.size, fill) if a is None or not fill else a.copy() for f, a in zip(flats, allowed)]
    pool.partition(k - 1)  # in place: the pool is ours
    t = pool[k - 1]
    del pool
    masks = []
    for f, a in zip(flats, allowed):
        m = f < t
        if a is not None:
            m &= a
        masks.append(m)
    missing = k - sum(int(np.count_nonzero(m)) for m in masks)
    for f, a, m in zip(flats, allowed, masks):
        if missing <= 0:
            break
        tied = (f == t) if a is None else (f == t) & a
        take = np.flatnonzero(tied)[:missing]
        m[take] = True
        missing -= take.size
    return masks


def layer_masks(scores: Sequence[np.ndarray], sparsity: float, min_threshold: float = 0.0) -> list[np.ndarray]:
    """Keep-masks pruning ``round(sparsity * n_l)`` lowest in every layer."""
    if min_threshold > 0 and sparsity > 1 - min_threshold + 1e-12:
        raise OnnxPruneError(f"sparsity {sparsity:g} per layer contradicts --min-threshold {min_threshold:g} "
                             f"(every layer would keep only {1 - sparsity:g} of its weights)")
    masks = []
    for s, floor in zip(scores, floors([int(s.size) for s in scores], min_threshold)):
        n = s.size
        k = min(int(round(sparsity * n)), n - floor)
        masks.append(~lowest(s.reshape(-1), k).reshape(s.shape))
    return masks
