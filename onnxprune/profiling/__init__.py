"""Profiling per hardware profile: latency, memory, size and MACs, measured rather than guessed.

``profile_model`` / ``compare_models`` (:mod:`.api`) are the entry points; hardware profiles are
YAML files validated by :mod:`.hw_profile`. GPU backends import their packages only when used.
"""
from __future__ import annotations

from .api import compare_models, profile_model
from .hw_profile import HwProfile, load_hw_profile, shipped_profiles

__all__ = ["profile_model", "compare_models", "HwProfile", "load_hw_profile", "shipped_profiles"]
