"""Sufficient statistics of a layer's sampled rows: everything calibration needs, in O(d^2) memory.

Kept *centred* in float64: row count ``n``, means of ``X`` and ``Y``, ``Cxx = (X - mx).T (X - mx)``,
``Cxy`` and per-output ``Cyy``. Each flushed block of rows is centred on its own means and merged
with Chan's parallel update, so a large mean (post-ReLU activations, a bias) never cancels against
the variance in float32 as uncentred sums ``X.T X`` do. Least squares with an intercept, activation
criteria, the BN shift and every reported error are closed-form in them, so rows are never kept:
memory does not grow with the number of samples. :attr:`RowStats.s` / :attr:`RowStats.p` give the
uncentred ``Z.T Z`` / ``Z.T Y`` (``Z = [X, 1]``) for code that wants them (the OBS Hessian).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RowStats:
    """Running centred statistics of one layer's (X, Y) rows (float64)."""

    d: int  # input columns
    out: int  # output channels
    full: bool = True  # False: only the diagonal of Cxx and no Cxy (wanda needs no more; d may be huge)
    n: int = 0
    mx: np.ndarray = field(init=False)
    my: np.ndarray = field(init=False)
    cxx: np.ndarray = field(init=False)  # [d, d] (full) or [d] (diagonal)
    cxy: np.ndarray = field(init=False)  # [d, out] (full) or [0, out]
    cyy: np.ndarray = field(init=False)  # [out]

    def __post_init__(self) -> None:
        self.mx, self.my = np.zeros(self.d), np.zeros(self.out)
        self.cxx = np.zeros((self.d, self.d) if self.full else (self.d,))
        self.cxy = np.zeros((self.d if self.full else 0, self.out))
        self.cyy = np.zeros(self.out)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Merge a block of rows (Chan et al.'s parallel update of centred sums)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        m = len(x)
        if m == 0:
            return
        bx, by = x.mean(0), y.mean(0)
        xc = (x - bx).astype(np.float32)  # centred: float32 products lose nothing that matters
        yc = (y - by).astype(np.float32)
        n = self.n
        tot = n + m
        dx, dy = bx - self.mx, by - self.my
        f = n * m / tot
        if self.full:
            self.cxx += (xc.T @ xc).astype(np.float64) + f * np.outer(dx, dx)
            self.cxy += (xc.T @ yc).astype(np.float64) + f * np.outer(dx, dy)
        else:
            self.cxx += np.einsum("ij,ij->j", xc, xc, dtype=np.float64) + f * dx * dx
        self.cyy += np.einsum("ij,ij->j", yc, yc, dtype=np.float64) + f * dy * dy
        self.mx += dx * (m / tot)
        self.my += dy * (m / tot)
        self.n = tot

    # ---- views
    @property
    def x_mean(self) -> np.ndarray:
        return self.mx

    @property
    def x_var(self) -> np.ndarray:
        """Centred sum of squares of each input column."""
        return np.diag(self.cxx) if self.full else self.cxx

    @property
    def x_sq(self) -> np.ndarray:
        """Sum of squares of each input column (diagonal of ``X.T X``)."""
        return self.x_var + self.n * self.mx ** 2

    @property
    def y_sum(self) -> np.ndarray:
        return self.n * self.my

    @property
    def yy(self) -> np.ndarray:
        """Per output, ``sum Y**2`` (uncentred)."""
        return self.cyy + self.n * self.my ** 2

    @property
    def s(self) -> np.ndarray:
        """Uncentred ``Z.T Z`` with ``Z = [X, 1]`` (full) or its diagonal."""
        n, mx = self.n, self.mx
        if not self.full:
            return np.append(self.x_sq, n)
        s = np.empty((self.d + 1, self.d + 1))
        s[:-1, :-1] = self.cxx + n * np.outer(mx, mx)
        s[:-1, -1] = s[-1, :-1] = n * mx
        s[-1, -1] = n
        return s

    @property
    def p(self) -> np.ndarray:
        """Uncentred ``Z.T Y`` (full), or only its intercept row."""
        if not self.full:
            return self.y_sum[None, :]
        return np.vstack([self.cxy + self.n * np.outer(self.mx, self.my), self.y_sum[None, :]])

    def covariance(self, cols: np.ndarray) -> np.ndarray:
        """Centered covariance of the input columns ``cols``."""
        return self.cxx[np.ix_(cols, cols)] / max(self.n, 1)

    def sq_error(self, cols: np.ndarray, outs: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Per output, ``sum (Z[:, cols + 1] @ a - Y[:, outs])**2``; ``a`` is [len(cols) + 1, len(outs)]
        with the intercept last (centred: the residual's variance plus its mean squared)."""
        w, c = a[:-1], a[-1]
        cw = self.cxx[np.ix_(cols, cols)] @ w
        err = np.einsum("ij,ij->j", w, cw) - 2 * np.einsum("ij,ij->j", w, self.cxy[np.ix_(cols, outs)]) + self.cyy[outs]
        bias = self.mx[cols] @ w + c - self.my[outs]
        return np.maximum(err + self.n * bias ** 2, 0.0)
