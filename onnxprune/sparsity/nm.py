"""N:M sparsity: in every group of M consecutive weights along the reduction (input-channel) axis,
at most N are nonzero.

This is the layout NVIDIA sparse tensor cores (TensorRT, cuSPARSELt) expect for 2:4: a Conv
weight ``[Cout, Cin/g, kh, kw]`` is grouped along ``Cin`` for each ``(cout, kh, kw)``; a Gemm/MatMul
weight along ``K``. A layer whose reduction length is not a multiple of M cannot take the pattern
and is left dense. (ConvTranspose ``[Cin, Cout/g, k...]`` is grouped along ``Cin``; with
``group > 1`` the per-group length ``Cin/g`` must be a multiple of M, so runs never straddle groups.)
"""
from __future__ import annotations

import numpy as np

from ..metrics.patterns import _grouped, satisfies_nm  # noqa: F401 - satisfies_nm is public here too
from .select import Prunable


def nm_keep_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with the ``n`` largest ``|w|`` of every run of ``m`` along ``axis`` (ties: the first).

    Each entry's rank in its run is counted with ``m * m`` elementwise comparisons rather than an
    argsort: the same choice, in the weight's own precision, with small-integer ranks instead of
    int64 indices (a sort held several copies of a large layer)."""
    axis = axis % w.ndim
    g = _grouped(np.abs(w), m, axis)  # |w| is exact in the weight's own dtype
    rank = np.zeros(g.shape, dtype=np.min_scalar_type(m))  # how many entries of its run come first
    for i in range(m):
        for j in range(m):
            if j != i:
                before = g[..., j] >= g[..., i] if j < i else g[..., j] > g[..., i]
                rank[..., i] += before
    moved_shape = np.moveaxis(w, axis, -1).shape
    return np.moveaxis((rank < n).reshape(moved_shape), -1, axis)


def nm_ineligible_reason(p: Prunable, m: int) -> str | None:
    """Why layer ``p`` cannot take an N:M pattern with this ``m``, or None when it can."""
    length = p.reduction_size
    if length % m:
        what = "input channels per group" if p.op_type.startswith("Conv") else "reduction dim (K)"
        return f"{what} {length} not divisible by {m}"
    return None
