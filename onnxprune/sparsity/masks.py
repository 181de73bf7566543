"""Nonzero masks of pruned weights, so retraining can keep the sparsity pattern.

Fine-tuning a weight-pruned model updates the zeros too; multiplying each weight (or its gradient)
by its mask after every step keeps them at zero.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..core.graph import build_view
from .select import prunable_weights
from .storage import densify


def masks_of(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{initializer name: bool array (True = nonzero, keep)}`` for every Conv/ConvTranspose/Gemm/MatMul
    weight that has at least one exact zero (weights with no zero need no mask)."""
    view = build_view(densify(model), infer=False)
    out: dict[str, np.ndarray] = {}
    for p in prunable_weights(view):
        w = view.const(p.weight)
        mask = w != 0
        if not mask.all():
            out[p.weight] = mask
    return out


def apply_masks(weights: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``weights`` with every masked entry set to zero (names without a mask pass unchanged)."""
    return {k: (np.where(masks[k], v, np.zeros((), dtype=v.dtype)) if k in masks else v) for k, v in weights.items()}
