"""JSON for onnxprune's records: one ``default=`` for every ``json.dumps`` that writes results
(``--json`` output, run state, reports), so numpy figures, paths and pydantic models serialize the
same everywhere."""
from __future__ import annotations

from typing import Any


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays, paths, pydantic models, sets and tuples."""
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__fspath__"):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
