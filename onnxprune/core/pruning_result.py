"""What every pruning entry point returns: the pruned model and a JSON-ready summary.

Shared by structured (:func:`onnxprune.structured.prune.prune_structured`) and unstructured / N:M
(:func:`onnxprune.sparsity.prune.prune_unstructured`, :func:`onnxprune.sparsity.prune.prune_nm`)
pruning, so the CLI, recipes and reports handle them alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx


@dataclass
class PruneResult:
    """A pruned model and its summary (the ``--json`` object of ``onnxprune prune``)."""

    model: onnx.ModelProto
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The summary, plain JSON-serializable data."""
        return self.summary
