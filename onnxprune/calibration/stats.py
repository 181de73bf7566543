"""Sufficient statistics of a layer's sampled rows: everything calibration needs, in O(d^2) memory.

With ``Z = [X, 1]`` (an intercept column) they are ``S = Z.T Z``, ``P = Z.T Y`` and ``sum Y**2`` per
output. Least squares, activation criteria, the BN shift and every error reported are closed-form in
them, so rows are never kept: memory does not grow with the number of samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RowStats:
    """Running ``S``, ``P``, ``yy`` and row count of one layer (float64)."""

    d: int  # input columns
    out: int  # output channels
    full: bool = True  # False: only the diagonal of S (wanda needs no more; d may be huge)
    n: int = 0
    s: np.ndarray = field(init=False)
    p: np.ndarray = field(init=False)
    yy: np.ndarray = field(init=False)
    xsum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.s = np.zeros((self.d + 1, self.d + 1) if self.full else (self.d + 1,))
        self.p = np.zeros((self.d + 1, self.out)) if self.full else np.zeros((1, self.out))
        self.yy = np.zeros(self.out)
        self.xsum = np.zeros(self.d)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.float32)
        self.n += len(x)
        if self.full:
            z = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
            self.s += z.T @ z  # float32 products per batch, accumulated in float64
            self.p += z.T @ y
        else:
            self.s[:-1] += np.einsum("ij,ij->j", x, x, dtype=np.float64)
            self.s[-1] += len(x)
            self.p[0] += y.sum(0, dtype=np.float64)
        self.xsum += x.sum(0, dtype=np.float64)
        self.yy += np.einsum("ij,ij->j", y, y, dtype=np.float64)

    # ---- views
    @property
    def x_sq(self) -> np.ndarray:
        """Sum of squares of each input column (diagonal of ``X.T X``)."""
        return (np.diag(self.s) if self.full else self.s)[:-1]

    @property
    def x_mean(self) -> np.ndarray:
        return self.xsum / max(self.n, 1)

    @property
    def y_sum(self) -> np.ndarray:
        return self.p[-1]

    def covariance(self, cols: np.ndarray) -> np.ndarray:
        """Centered covariance of the input columns ``cols``."""
        n = max(self.n, 1)
        mu = self.s[-1, cols] / n
        return self.s[np.ix_(cols, cols)] / n - np.outer(mu, mu)

    def sq_error(self, cols: np.ndarray, outs: np.ndarray, a: np.ndarray) -> np.ndarray:
        """Per output, ``sum (Z[:, cols + 1] @ a - Y[:, outs])**2``; ``a`` is [len(cols) + 1, len(outs)]
        with the intercept last."""
        idx = np.append(cols, self.d)
        sa = self.s[np.ix_(idx, idx)] @ a
        err = np.einsum("ij,ij->j", a, sa) - 2 * np.einsum("ij,ij->j", a, self.p[np.ix_(idx, outs)]) + self.yy[outs]
        return np.maximum(err, 0.0)
