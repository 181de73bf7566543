"""Run reports: the versioned ``report.json`` schema, plots, Markdown/HTML rendering, run comparison."""
from __future__ import annotations

from .schema import SCHEMA_VERSION, pareto_front, stat, validate_report

__all__ = ["SCHEMA_VERSION", "pareto_front", "stat", "validate_report"]
