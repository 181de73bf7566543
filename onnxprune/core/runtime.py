"""ONNX Runtime sessions, built one way for every call site.

Evaluation, calibration, the rewrite's validation, sparse-storage checks, the bridge check and the
profilers all run models in ONNX Runtime. They differ only in what they ask for (threads, graph
optimizations, providers, how quiet a failed load must be), so the options are explicit arguments
here and nothing is inherited from the environment (``OMP_NUM_THREADS``) by accident. Models over
protobuf's 2 GB limit go through a temporary external-data file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx

from .errors import OnnxPruneError, ort_error_text
from .model_io import PROTOBUF_LIMIT, proto_bytes
import onnxruntime as ort

CPU = ("CPUExecutionProvider",)


def session_options(*, intra_op: int | None = None, inter_op: int | None = None, optimize: bool = True,
                    quiet: bool = False, arena: bool = True, sequential: bool = True,
                    profile_prefix: str | None = None):
    """``onnxruntime.SessionOptions``: ``intra_op``/``inter_op`` threads (None: the runtime's default,
    all physical cores), full graph optimizations or none, and logging: warnings and errors, or
    nothing at all (``quiet``: the caller raises the reason itself)."""

    so = ort.SessionOptions()
    if intra_op is not None:
        so.intra_op_num_threads = int(intra_op)
    if inter_op is not None:
        so.inter_op_num_threads = int(inter_op)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.enable_cpu_mem_arena = arena
    so.log_severity_level = 4 if quiet else 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def open_session(model: "onnx.ModelProto | str | os.PathLike", *, options=None,
                 providers: Sequence = CPU, what: str | None = None):
    """An ``InferenceSession`` over a model in memory or a file; any load failure becomes one
    :class:`OnnxPruneError` line naming ``what`` (default: the file, or "model")."""

    options = options if options is not None else session_options()
    label = what or (str(model) if not isinstance(model, onnx.ModelProto) else "model")
    try:
        if not isinstance(model, onnx.ModelProto):
            path = Path(model)
            if not path.exists():
                raise OnnxPruneError(f"{path}: no such file")
            return ort.InferenceSession(str(path), options, providers=list(providers))
        if proto_bytes(model) > PROTOBUF_LIMIT:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "m.onnx")
                onnx.save_model(model, path, save_as_external_data=True, location="m.data")
                return ort.InferenceSession(path, options, providers=list(providers))
        return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - ORT raises assorted exception types; the message is what matters
        raise OnnxPruneError(f"{label}: ONNX Runtime cannot load it ({ort_error_text(exc)})") from None


def load_error(model: onnx.ModelProto, *, max_bytes: int = PROTOBUF_LIMIT) -> str | None:
    """Why ONNX Runtime cannot load ``model`` (one line), or None when it loads; models larger than
    ``max_bytes`` are not tried (None)."""
    if proto_bytes(model) > min(max_bytes, PROTOBUF_LIMIT):
        return None
    try:
        open_session(model, options=session_options(optimize=False, quiet=True))
    except OnnxPruneError as exc:
        return str(exc).split(": ", 1)[1] if ": " in str(exc) else str(exc)
    return None


def fixed_batch(model) -> int | None:
    """The batch size the graph inputs declare when it is a fixed number (None: dynamic), from a
    model or from a session's inputs."""
    if hasattr(model, "get_inputs"):
        first = model.get_inputs()[0].shape if model.get_inputs() else None
        return first[0] if first and isinstance(first[0], int) and first[0] > 0 else None
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def batches(feeds: Mapping[str, np.ndarray], batch_size: int, *, pad: bool = False) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """``(batch, rows)`` pairs over per-input arrays. With ``pad``, a short last batch is padded to
    ``batch_size`` by repeating its first row (for models with a fixed batch size); ``rows`` says how
    many rows are real."""
    n = len(next(iter(feeds.values())))
    for i in range(0, n, batch_size):
        part = {k: v[i:i + batch_size] for k, v in feeds.items()}
        rows = len(next(iter(part.values())))
        if pad and rows < batch_size:
            part = {k: np.concatenate([v, np.repeat(v[:1], batch_size - rows, axis=0)]) for k, v in part.items()}
        yield part, rows


def run_batches(session, names: Sequence[str], feeds: Mapping[str, np.ndarray], batch_size: int,
                fixed: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """The one batched runner: per batch, (the batch's inputs, ``names`` computed on it). A model
    whose batch dimension is ``fixed`` gets batches of exactly that size, the padding's outputs
    dropped; feeds the model does not read are left out; an output without the batch axis (a
    scalar, a per-model constant) is passed as it is. A run that fails is one OnnxPruneError line."""
    wanted = {i.name for i in session.get_inputs()}
    for part, rows in batches(feeds, fixed or batch_size, pad=fixed is not None):
        feed = {k: v for k, v in part.items() if k in wanted}
        try:
            got = session.run(list(names), feed)
        except Exception as exc:  # noqa: BLE001 - ORT raises assorted types
            raise OnnxPruneError(f"ONNX Runtime failed on inputs {({k: list(v.shape) for k, v in feed.items()})}: "
                                 f"{ort_error_text(exc)}") from None
        sent = len(next(iter(feed.values()))) if feed else rows
        yield ({k: v[:rows] for k, v in part.items()},
               {k: v[:rows] if np.ndim(v) and len(v) == sent else v for k, v in zip(names, got)})


def run_batched(session, feeds: Mapping[str, np.ndarray], *, batch_size: int, fixed: int | None = None,
                outputs: Sequence[str] | None = None, progress=None) -> dict[str, np.ndarray]:
    """Every output ``outputs`` (default: all) of ``session`` on all rows of ``feeds``, concatenated
    over the batches of :func:`run_batches`. ``progress`` is a
    :class:`~onnxprune.core.progress.ProgressBar` (or None)."""
    names = list(outputs or [o.name for o in session.get_outputs()])
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for part, got in run_batches(session, names, feeds, batch_size, fixed):
        for k in names:
            parts[k].append(got[k])
        if progress is not None:
            progress.advance(len(next(iter(part.values()))))
    return {k: np.concatenate(v) if v and np.ndim(v[0]) else (v[0] if v else np.zeros((0,))) for k, v in parts.items()}
