"""Closed-form fits on :class:`~onnxprune.calibration.stats.RowStats` (pure numpy).

Matrices ``a`` are ``[len(cols) + 1, len(outs)]``: the weights of the kept input columns for the kept
outputs, transposed, with the bias as the last row, so ``Z[:, cols + [intercept]] @ a`` is the layer's
output on the sampled rows.
"""
from __future__ import annotations

import numpy as np

from .stats import RowStats

#: ridge strength relative to each input column's energy (scale-invariant): enough to keep a fit
#: from a few thousand rows well-posed, small enough not to bias it (errors are reported)
DEFAULT_RIDGE = 1e-3


def as_affine(m: np.ndarray, b: np.ndarray, cols: np.ndarray, outs: np.ndarray) -> np.ndarray:
    """``a`` of the layer as it is: weight matrix ``m`` [out, d] and bias ``b`` restricted to ``cols``/``outs``."""
    return np.vstack([m[np.ix_(outs, cols)].T, b[outs][None, :]])


def ridge_fit(st: RowStats, cols: np.ndarray, outs: np.ndarray, ridge: float = DEFAULT_RIDGE,
              prior: np.ndarray | None = None) -> np.ndarray:
    """Least squares of the dense outputs ``outs`` on the input columns ``cols`` and an intercept,
    ridge-regularized on the weights only (the intercept carries what removed channels contributed
    on average): ``min ||Z a - Y||^2 + sum_j lam_j ||a_j - prior_j||^2``, ``lam_j`` = ``ridge`` times
    column j's centred sum of squares. ``prior`` ([len(cols), len(outs)], default zero) is what the weights shrink
    toward: the layer's original weights keep a column with no signal on the data (a dead channel)
    as it was, where shrinking toward zero would zero it (and ``finetune`` would keep it zero)."""
    return ridge_refit(st, cols, outs, ridge, prior)[0]


def ridge_refit(st: RowStats, cols: np.ndarray, outs: np.ndarray, ridge: float = DEFAULT_RIDGE,
                prior: np.ndarray | None = None, info: dict | None = None) -> tuple[np.ndarray, float]:
    """:func:`ridge_fit` and its :func:`rel_error`, the error from the normal equations
    (``C w = Cxy + lam (prior - w)``) instead of another ``d^2 x out`` product. Solved on the centred
    statistics (the intercept is ``my - mx w``) by :func:`cholesky_solve`; ``info`` (a dict) receives
    its ``condition`` and ``jitter``."""
    k = len(cols)
    c = st.cxx[np.ix_(cols, cols)].copy()
    var = st.x_var[cols]  # centred: a column's offset goes to the intercept, its spread sets the scale
    lam = np.where(var > 0, var * ridge, 1.0)
    c[np.arange(k), np.arange(k)] += lam
    cxy = st.cxy[np.ix_(cols, outs)]
    rhs = cxy.copy()
    if prior is not None:
        rhs += lam[:, None] * prior
    w, solved = cholesky_solve(c, rhs)
    if info is not None:
        info.update(solved)
    a = np.vstack([w, (st.my[outs] - st.mx[cols] @ w)[None, :]])
    # sum (Za - Y)^2 = Cyy - w'Cxy + w' lam (prior - w) at the solution (the intercept term is zero)
    shrink = (0.0 if prior is None else lam[:, None] * prior) - lam[:, None] * w
    err = np.maximum(st.cyy[outs] - np.einsum("ij,ij->j", w, cxy) + np.einsum("ij,ij->j", w, shrink), 0.0)
    ref = float(st.yy[outs].sum())
    return a, (float(np.sqrt(err.sum() / ref)) if ref > 0 else 0.0)


#: jitter tried on a matrix that is not numerically positive definite, relative to its mean diagonal
JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


def cholesky_solve(s: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """``s^-1 rhs`` for a symmetric positive (semi)definite ``s``: Cholesky first, adding increasing
    diagonal jitter (:data:`JITTERS`) until the factorization succeeds (least squares past the last).
    Also returns ``condition`` (estimated from the factor's diagonal: ``(max L_ii / min L_ii)^2``, a
    lower bound of the 2-norm condition number, at no extra cost) and the ``jitter`` that was used
    (both None when even the largest jitter fails, which only a non-finite matrix does)."""
    scale = float(np.mean(np.diag(s))) if len(s) else 1.0
    scale = scale if scale > 0 else 1.0
    for j in JITTERS:
        sj = s + np.eye(len(s)) * (j * scale) if j else s
        try:
            low = np.linalg.cholesky(sj)
        except np.linalg.LinAlgError:
            continue
        x = np.linalg.solve(sj, rhs)  # (numpy has no triangular solve; the factor proved sj definite)
        dg = np.abs(np.diag(low))
        cond = float((dg.max() / dg.min()) ** 2) if len(dg) else 1.0
        return x, {"condition": cond, "jitter": j * scale}
    x = np.linalg.lstsq(s, rhs, rcond=None)[0]  # (not definite even with 1% jitter: NaN or inf inside)
    return x, {"condition": None, "jitter": None}


def moments(st: RowStats, cols: np.ndarray, outs: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output: mean and standard deviation of ``Z[:, cols] @ a`` on the rows (with diagonal-only
    statistics of a very wide layer, the columns' covariances are taken as zero)."""
    mu = st.x_mean[cols]
    mean = mu @ a[:-1] + a[-1]
    if st.full:
        var = np.einsum("io,ij,jo->o", a[:-1], st.covariance(cols), a[:-1])
    else:
        var = np.einsum("io,i->o", a[:-1] ** 2, st.x_var[cols] / max(st.n, 1))
    return mean, np.sqrt(np.maximum(var, 0.0))


def dense_moments(st: RowStats, outs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output: mean and standard deviation of the dense outputs."""
    n = max(st.n, 1)
    return st.my[outs], np.sqrt(np.maximum(st.cyy[outs] / n, 0.0))


def shift_fit(st: RowStats, cols: np.ndarray, outs: np.ndarray, a0: np.ndarray, *, scale: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The relative shift correction of ``a0``: per output a factor ``r`` (dense std / pruned std when
    ``scale``, else 1) and an offset ``c`` so that ``r * (output) + c`` has the dense mean (and std).
    Returns (``a`` of the corrected output, ``r``, ``c``)."""
    mp, sp = moments(st, cols, outs, a0)
    md, sd = dense_moments(st, outs)
    r = np.where(sp > 1e-12, sd / np.maximum(sp, 1e-12), 1.0) if scale else np.ones_like(mp)
    c = md - r * mp
    a = a0 * r[None, :]
    a[-1] += c
    return a, r, c


def rel_error(st: RowStats, cols: np.ndarray, outs: np.ndarray, a: np.ndarray) -> float | None:
    """``||Z a - Y|| / ||Y||`` over the kept outputs on the sampled rows (relative L2); None from
    diagonal-only statistics (a very wide layer), which do not determine it."""
    if not st.full:
        return None
    ref = float(st.yy[outs].sum())
    return float(np.sqrt(st.sq_error(cols, outs, a).sum() / ref)) if ref > 0 else 0.0


def channel_energy(st: RowStats, m: np.ndarray, taps: int) -> np.ndarray:
    """Per input channel, the variance it contributes to the layer's outputs on the data:
    ``sum_o w_oc C_cc w_oc`` over its ``taps`` columns (centered: a constant goes to the bias)."""
    out, d = m.shape
    c = d // taps
    if st.full:
        cov = st.covariance(np.arange(d)).reshape(c, taps, c, taps)
        blocks = cov[np.arange(c), :, np.arange(c), :]  # [c, taps, taps]
        m3 = m.reshape(out, c, taps)
        return np.einsum("oct,ctu,ocu->c", m3, blocks, m3)
    var = st.x_var / max(st.n, 1)
    return (np.square(m) * var[None, :]).sum(0).reshape(c, taps).sum(1)
