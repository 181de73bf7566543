"""Structured (channel) pruning: importance criteria, allocation, target search and the
:func:`prune_structured` API behind ``onnxprune prune --structured``."""
from __future__ import annotations

from .allocate import Limits, allocate
from .importance import IMPORTANCE, ScoreInputs


def prune_structured(*args, **kwargs):
    """See :func:`onnxprune.structured.prune.prune_structured` (imported lazily: it needs the
    channel analysis and rewrite modules)."""
    from .prune import prune_structured as _impl

    return _impl(*args, **kwargs)


__all__ = ["IMPORTANCE", "Limits", "ScoreInputs", "allocate", "prune_structured"]
