"""onnxprune: prune ONNX models for deployment and measure what it buys, honestly.

The Python API mirrors the CLI; every function returns plain data (the ``--json`` shapes).
"""
from __future__ import annotations

from .core.errors import OnnxPruneError, UnavailableError
from .core.version import __version__
from .metrics.inspection import inspect_model
from .core.model_io import load_model, save_model
from .core.normalize import normalize
from .core.prepare import prepare
from . import api


#: The Python API of :mod:`onnxprune.api` (imported on first use, so ``import onnxprune`` stays light):
#: ``onnxprune.prune(...)``, ``onnxprune.run(...)`` ... (``onnxprune.api.report`` re-renders a run directory).
_API = ("inspect", "analyze", "prune", "finetune", "evaluate", "profile", "compare", "run", "compare_runs", "demo")

__all__ = ["OnnxPruneError", "UnavailableError", "inspect_model", "load_model", "save_model", "normalize", "prepare",
           "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(api, name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
