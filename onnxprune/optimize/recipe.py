"""``OUTDIR/recipe.yaml``: the chosen path as a recipe for ``onnxprune run``.

The allocation's kept channels become the stage's ``per_layer`` ratios (group ``g<id>``: the same
channels, chosen by the same criterion), distillation becomes ``retrain`` with ``distillation`` and
``distill_alpha: 1`` (the dense model's outputs only), the profile and batch size become ``hw`` and
``profiling``. The recipe is validated with the recipe loader before it is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml

from ..core.model_io import write_text_atomic
from ..recipes.loader import validate_recipe


def recipe_of(chosen: Mapping[str, Any], *, model: Path, hw: str, data_spec: Any, batch: int,
              criterion: str = "l1") -> dict[str, Any]:
    groups = chosen.get("groups") or []
    ratios = {f"g{g['id']}": round(1.0 - g["kept"] / g["total"], 6) for g in groups if g["kept"] < g["total"]}
    epochs = int(chosen.get("epochs") or 0)
    raw: dict[str, Any] = {
        "name": f"optimize-{model.stem}",
        "description": f"written by onnxprune optimize: candidate {chosen['id']} ({chosen['path']})",
        "stages": [{"kind": "structured", "criterion": criterion, "per_layer": ratios or {"g0": 0.0}, "hw": hw}],
        "retrain": {"epochs": epochs, **({"distillation": True, "distill_alpha": 1.0, "train_bn": True} if epochs else {})},
        "evaluation": {"splits": ["val", "test"]},
        "hw": [hw],
        "profiling": {"batch_sizes": [int(batch)]},
    }
    if isinstance(data_spec, (str, dict)):
        raw["data"] = data_spec
    return raw


def write_recipe(raw: dict[str, Any], path: Path) -> Path:
    """Validate ``raw`` with the recipe loader, then write it (a recipe that does not load is a bug here)."""

    validate_recipe(raw, "optimize recipe")
    return write_text_atomic(path, yaml.safe_dump(raw, sort_keys=False))
