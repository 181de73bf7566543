"""Retraining in PyTorch (needs the ``train`` extra: torch, torch-pruning, scikit-learn).

Nothing here imports torch at import time; the functions do, when called.

* :class:`TrainConfig` - the full retraining configuration, recorded with every result.
* :func:`finetune` - ONNX in, ONNX out: bridge -> train (masks kept) -> write back -> test once.
* :func:`train_module` - the same loop on any ``nn.Module`` (the PyTorch-source path uses it).
* :func:`weight_gradients` - mean loss gradients per initializer (Taylor / magnitude x gradient).
* :func:`prune_gradually`, :func:`agp_schedule` - iterative prune -> retrain (Zhu & Gupta's AGP).
"""
from __future__ import annotations

from typing import Any

from .config import TrainConfig
import importlib

_LAZY = {
    "finetune": "retrain", "train_module": "loop", "evaluate_module": "loop", "weight_gradients": "gradients",
    "prune_gradually": "gradual", "agp_schedule": "gradual", "linear_schedule": "gradual",
    "distillation_loss": "distill", "training_loss": "distill", "lr_at": "schedules", "lr_factor": "schedules",
}

__all__ = ["TrainConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
