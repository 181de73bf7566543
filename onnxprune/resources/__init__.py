"""Shipped recipes and hardware profiles (the top-level ``recipes/`` and ``hw_profiles/`` folders,
linked here so they install with the package)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def shipped(kind: str) -> dict[str, Path]:
    """Shipped YAML files of ``kind`` ("recipes" or "hw_profiles") by stem name."""
    folder = ROOT / kind
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}
