"""Importance criteria for weight-level pruning: higher score = more important (kept longer).

Every criterion maps the list of prunable weights to one float64 score array per weight, same
shape. Weights that are already exactly zero score ``-inf`` under every criterion: they are pruned
first, so pruning an already sparse model never spends its budget elsewhere.

- ``magnitude``: ``|w|`` (Han et al.; the Global MP baseline).
- ``random``: uniform scores from ``numpy.random.default_rng(seed)``, drawn layer by layer in graph
  order (the control baseline of ShrinkBench); reproducible by seed.
- ``lamp``: Layer-Adaptive Magnitude-based Pruning (Lee et al., ICLR 2021): with a layer's weights
  sorted by ascending magnitude, ``score(u) = w_u^2 / sum_{v >= u} w_v^2``. Meant for the global
  scope (within one layer it orders weights exactly as magnitude does).
- ``magnitude_x_gradient``: ``|w * dL/dw|``, the first-order Taylor estimate of the loss change
  (needs gradients from data: ``onnxprune.training.weight_gradients``).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from ..core.errors import OnnxPruneError
from .select import Prunable

ScoreFn = Callable[..., list[np.ndarray]]


def magnitude(weights: Sequence[np.ndarray], **_: object) -> list[np.ndarray]:
    """|w|, in float32 for float32/float16 weights (abs and the widening are exact, so the ranking is
    the float64 one, at half the memory: the scores of a multi-GB model are as large as its weights)."""
    return [np.abs(w).astype(np.result_type(w.dtype, np.float32), copy=False) for w in weights]


def random(weights: Sequence[np.ndarray], *, seed: int = 0, **_: object) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(w.shape) for w in weights]


def lamp(weights: Sequence[np.ndarray], **_: object) -> list[np.ndarray]:
    out = []
    for w in weights:
        sq = np.square(w.astype(np.float64)).reshape(-1)
        order = np.argsort(sq, kind="stable")
        sorted_sq = sq[order]
        suffix = np.cumsum(sorted_sq[::-1])[::-1]  # sum_{v >= u} in sorted order
        with np.errstate(invalid="ignore", divide="ignore"):
            s_sorted = np.where(suffix > 0, sorted_sq / np.where(suffix > 0, suffix, 1.0), 0.0)
        score = np.empty_like(sq)
        score[order] = s_sorted
        out.append(score.reshape(w.shape))
    return out


def magnitude_x_gradient(weights: Sequence[np.ndarray], *, prunable: Sequence[Prunable] = (),
                         gradients: Mapping[str, np.ndarray] | None = None, **_: object) -> list[np.ndarray]:
    if gradients is None:
        raise OnnxPruneError("criterion magnitude_x_gradient needs gradients: pass --data SPEC (or gradients=...)")
    out = []
    for p, w in zip(prunable, weights):
        if p.weight not in gradients:
            raise OnnxPruneError(f"criterion magnitude_x_gradient: no gradient for weight {p.weight!r}")
        g = np.asarray(gradients[p.weight], dtype=np.float64)
        if g.shape != w.shape:
            raise OnnxPruneError(f"criterion magnitude_x_gradient: gradient of {p.weight!r} has shape "
                                 f"{list(g.shape)}, weight has {list(w.shape)}")
        out.append(np.abs(w.astype(np.float64) * g))
    return out


def wanda(weights: Sequence[np.ndarray], *, prunable: Sequence[Prunable] = (),
          activations: Mapping[str, np.ndarray] | None = None, **_: object) -> list[np.ndarray]:
    """Wanda (Sun et al. 2023): ``|w| * ||X_j||_2``, the weight times the norm of the input channel it
    reads on calibration data (``onnxprune.calibration.weights.input_norms``; ``--calibrate SPEC``),
    compared within each output (its comparison group): the score is the weight's rank quantile in its
    output row, so every output keeps the same share (a BatchNorm after the layer rescales outputs,
    making magnitudes of different rows incomparable)."""
    return [_row_quantiles(s, p) for s, p in zip(wanda_products(weights, prunable=prunable, activations=activations), prunable)]


def wanda_products(weights: Sequence[np.ndarray], *, prunable: Sequence[Prunable] = (),
                   activations: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """``|w| * ||X_j||_2`` per weight (the raw wanda metric, for ranking within N:M runs)."""
    if activations is None:
        raise OnnxPruneError("criterion wanda needs calibration data: pass --calibrate SPEC")
    out = []
    for p, w in zip(prunable, weights):
        if p.weight not in activations:
            raise OnnxPruneError(f"criterion wanda: no activations for layer {p.node!r} ({p.op_type})")
        out.append(np.abs(w).astype(np.float64) * activations[p.weight])
    return out


def _row_quantiles(score: np.ndarray, p: Prunable) -> np.ndarray:
    """Each score's rank in its output row, in (0, 1]."""
    out_axis = 1 if p.reduction_axis == 0 else 0
    rows = np.moveaxis(score, out_axis, 0)
    flat = rows.reshape(rows.shape[0], -1)
    q = np.empty_like(flat)
    np.put_along_axis(q, np.argsort(flat, axis=1, kind="stable"), (np.arange(flat.shape[1]) + 1.0) / flat.shape[1], axis=1)
    return np.moveaxis(q.reshape(rows.shape), 0, out_axis)


#: criterion name -> score function
CRITERIA: dict[str, ScoreFn] = {
    "magnitude": magnitude,
    "random": random,
    "lamp": lamp,
    "magnitude_x_gradient": magnitude_x_gradient,
    "wanda": wanda,
}


def score_weights(criterion: str, prunable: Sequence[Prunable], weights: Sequence[np.ndarray], *, seed: int = 0,
                  gradients: Mapping[str, np.ndarray] | None = None,
                  activations: Mapping[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """Scores of ``weights`` under ``criterion``; exact zeros get ``-inf``."""
    if criterion not in CRITERIA:
        raise OnnxPruneError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    scores = CRITERIA[criterion](weights, seed=seed, prunable=prunable, gradients=gradients, activations=activations)
    for s, w in zip(scores, weights):
        s[w == 0] = -np.inf
    return scores
