"""Which axis a weight reduces over, and whether it holds an N:M pattern: what ``inspect`` reports
about every layer, and what N:M pruning enforces (``onnxprune.sparsity.nm``)."""
from __future__ import annotations

import numpy as np
import onnx

from ..core.graph import attr


def reduction_axis(node: onnx.NodeProto, index: int, shape: tuple[int, ...]) -> int:
    """The non-negative axis of weight input ``index`` of ``node`` that the op reduces over."""
    rank = len(shape)
    if node.op_type == "Conv":
        return 1
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Gemm":
        return 1 if attr(node, "transB", 0) else 0
    # MatMul
    if rank == 1:
        return 0
    return rank - 2 if index == 1 else rank - 1


def _grouped(w: np.ndarray, m: int, axis: int) -> np.ndarray:
    """View ``w`` with ``axis`` moved last and split into runs of ``m``: shape ``[..., C/m, m]``."""
    moved = np.moveaxis(w, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def satisfies_nm(w: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True when every run of ``m`` consecutive entries of ``w`` along ``axis`` has at most ``n`` nonzeros
    (False when that axis is not a multiple of ``m``)."""
    w = np.asarray(w)
    if w.ndim == 0:
        return False
    axis = axis % w.ndim
    if w.shape[axis] == 0 or w.shape[axis] % m:
        return False
    return bool((np.count_nonzero(_grouped(w, m, axis), axis=-1) <= n).all())


def nm_status(node_op: str, w: np.ndarray, axis: int, group: int = 1, n: int = 2, m: int = 4) -> dict[str, bool]:
    """``{"2:4": satisfies, "eligible": reduction length divisible by m}`` (the ``inspect`` per-node field)."""
    length = w.shape[axis] // group if node_op == "ConvTranspose" else w.shape[axis]
    eligible = length > 0 and length % m == 0
    if not eligible:
        return {f"{n}:{m}": False, "eligible": False}
    # ConvTranspose groups are contiguous blocks of the input-channel axis, so runs never straddle them
    return {f"{n}:{m}": satisfies_nm(w, n, m, axis), "eligible": True}
