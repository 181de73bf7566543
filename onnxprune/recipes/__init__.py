"""Recipes: validated YAML descriptions of a pruning run (see :mod:`onnxprune.recipes.schema`)."""
from __future__ import annotations

from .loader import load_recipe, parse_override, resolve_recipe, shipped_recipes, validate_recipe
from .schema import (LatencyTarget, Method, Recipe, Retrain, Schedule, Sensitivity, Stage, Sweep, Target)

__all__ = ["load_recipe", "parse_override", "resolve_recipe", "shipped_recipes", "validate_recipe", "LatencyTarget",
           "Method", "Recipe", "Retrain", "Schedule", "Sensitivity", "Stage", "Sweep", "Target"]
