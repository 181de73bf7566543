"""Weight-level sparsity: unstructured (magnitude, random, LAMP, magnitude x gradient; global,
layer-wise, global with a minimum threshold) and N:M, with masks and sparse storage.

Public API: :func:`prune_unstructured`, :func:`prune_nm`, :func:`masks_of`, :func:`satisfies_nm`.
"""
from __future__ import annotations

from .masks import masks_of
from .nm import satisfies_nm
from .prune import prune_nm, prune_unstructured

__all__ = ["prune_unstructured", "prune_nm", "masks_of", "satisfies_nm"]
