"""Structured (channel) pruning: importance criteria, allocation, target search and the
:func:`prune_structured` API behind ``onnxprune prune --structured``."""
from __future__ import annotations

from .allocate import Limits, allocate
from .importance import IMPORTANCE, ScoreInputs
from .prune import prune_structured

__all__ = ["IMPORTANCE", "Limits", "ScoreInputs", "allocate", "prune_structured"]
