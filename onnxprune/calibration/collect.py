"""Run the dense model with ONNX Runtime and reduce the layers' inputs/outputs to :class:`RowStats`.

The layers' input activations (and their outputs, unless computed from the weights) are exposed as
extra graph outputs on a *copy* of the model; each batch's activations are reduced to sampled rows,
buffered (:data:`PENDING_BYTES` per layer), added to the statistics and dropped, so memory is bounded
by one batch of activations plus ``O(d^2)`` per layer, whatever the sample count.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from ..core.shapes import value_dtypes, skeleton, fix_input_shapes, infer_value_shapes
from .layers import Layer
from .stats import RowStats
from ..core.runtime import fixed_batch, open_session, run_batched, run_batches
from ..core.progress import ProgressBar

#: activations one batch may expose (bytes): the batch size follows from the layers' tensor sizes
BATCH_BYTES = 256 * 2**20

#: sampled rows one layer buffers before adding them to its statistics (bytes): one Gram product per
#: few hundred rows instead of one per batch, whose d x d update costs as much as the product itself
PENDING_BYTES = 8 * 2**20

#: total sampled rows per layer (spread over the samples); enough for a well-posed ridge fit of the
#: usual layer widths, small enough that collecting stays a fraction of one forward pass
DEFAULT_ROWS = 4096


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (intermediate tensors)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}  # inputs: read from the feed
    dtypes = value_dtypes(onnx.shape_inference.infer_shapes(_skeleton(m)))
    for name in names:
        if name not in have:
            m.graph.output.append(helper.make_tensor_value_info(name, dtypes.get(name, onnx.TensorProto.FLOAT), None))
            have.add(name)
    return m


def _skeleton(m: onnx.ModelProto) -> onnx.ModelProto:
    return skeleton(m)


def session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session of ``model``."""
    return open_session(model, what="the model for calibration")


def prefix(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that computes only ``outputs`` (intermediate tensors or graph outputs):
    the nodes they need, every graph input kept. Running a stage of a deep model costs its prefix."""
    m = with_outputs(model, outputs)
    want = set(outputs)
    needed: list[onnx.NodeProto] = []
    for node in reversed(list(m.graph.node)):
        if want & set(node.output):
            needed.append(node)
            want |= {i for i in node.input if i} | _outer_names(node)
    keep = {id(n) for n in needed}
    nodes = [n for n in m.graph.node if id(n) in keep]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    outs = [o for o in m.graph.output if o.name in set(outputs)]
    del m.graph.output[:]
    m.graph.output.extend(outs)
    dropped = {t.name for t in m.graph.initializer if t.name not in want}
    inits = [t for t in m.graph.initializer if t.name in want]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    ins = [i for i in m.graph.input if i.name not in dropped]  # (IR < 4 lists initializers as inputs too)
    del m.graph.input[:]
    m.graph.input.extend(ins)
    return m


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read inside ``node``'s subgraphs (If/Loop/Scan read outer-scope tensors)."""
    names: set[str] = set()
    for a in node.attribute:
        for g in list(a.g.node and [a.g] or []) + list(a.graphs):
            for n in g.node:
                names |= {i for i in n.input if i} | _outer_names(n)
    return names


def run(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, batch_size: int = 32,
        progress: bool = False, what: str = "running") -> dict[str, np.ndarray]:
    """The graph outputs of ``model`` on ``inputs``, batched."""
    n = len(next(iter(inputs.values())))
    with ProgressBar(n, what, enabled=progress, transient=True) as bar:
        return run_batched(session(model), inputs, batch_size=batch_size, fixed=fixed_batch(model), progress=bar)


def _batch_size(model: onnx.ModelProto, tensors: Sequence[str], inputs: Mapping[str, np.ndarray], most: int) -> int:
    """Samples per batch such that the exposed activations of one batch stay within :data:`BATCH_BYTES`
    (shapes inferred for one sample of the calibration data's size)."""

    try:
        fixed = fix_input_shapes(_skeleton(model), {k: (1,) + tuple(v.shape[1:]) for k, v in inputs.items()})
        shapes = infer_value_shapes(fixed)
    except Exception:  # noqa: BLE001 - sizing is a heuristic: fall back to the default
        return most
    per = sum(4 * math.prod(int(d) for d in shapes[t] if isinstance(d, int)) for t in tensors if shapes.get(t))
    return max(1, min(most, BATCH_BYTES // max(per, 1)))


def collect_stats(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], layers: Sequence[Layer],
                  shapes: Mapping[str, tuple[int, ...]], *, full: bool = True, rows: int = DEFAULT_ROWS,
                  keep_outputs: int = 0, batch_size: int = 16, seed: int = 0,
                  progress: bool = False, affine: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                  mask: str | None = None) -> tuple[dict[str, RowStats], dict[str, np.ndarray]]:
    """Statistics of every layer on ``inputs`` (one pass of ``model``), and the graph outputs of the
    first ``keep_outputs`` samples (the reference that errors after calibration are measured on).

    ``shapes``: initializer name -> dims, for the layers' weights. ``full=False`` keeps only what
    wanda needs (column norms). ``affine``: node -> (``M`` [out, d], bias) of layers whose output rows
    are computed from their input rows instead of read from ONNX Runtime: exposing a layer's output
    blocks the runtime's Conv+activation fusions (about 40% of the pass on ResNet-50)."""
    affine = affine or {}
    n = len(next(iter(inputs.values())))
    per_sample = max(1, math.ceil(rows / max(n, 1)))
    graph_outs = [o.name for o in model.graph.output]
    tensors = list(dict.fromkeys([t for l in layers for t in ((l.x,) if l.node in affine else (l.x, l.y))]))
    sess = session(with_outputs(model, tensors))
    feeds = {i.name for i in model.graph.input}
    names = [t for t in dict.fromkeys(graph_outs + tensors) if t not in feeds]
    stats = {}
    for l in layers:
        w = shapes[l.weight]
        d = (w[1] * math.prod(w[2:])) if l.op_type == "Conv" else w[l.in_axis]
        stats[l.node] = RowStats(d=int(d), out=int(w[l.out_axis]), full=full)
    kept: dict[str, list[np.ndarray]] = {k: [] for k in graph_outs}
    rng = np.random.default_rng(seed)
    bs = _batch_size(model, tensors, inputs, batch_size)
    done = 0
    pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {l.node: [] for l in layers}
    with ProgressBar(n, "calibration: collecting activations", enabled=progress, transient=True) as bar:
        for b, outs in run_batches(sess, names, inputs, bs, fixed_batch(model)):
            got = {**b, **outs}
            m = got.get(mask) if mask else None
            for l in layers:
                x = got[l.x]
                pending[l.node].append(l.rows(x, None if l.node in affine else got[l.y], per_sample, rng,
                                              l.valid_positions(x.shape, m)))
                if sum(x.nbytes for x, _ in pending[l.node]) >= PENDING_BYTES:
                    _flush(stats[l.node], pending[l.node], affine.get(l.node))
            if done < keep_outputs:
                for k in graph_outs:
                    kept[k].append(got[k][:keep_outputs - done])
            done += len(next(iter(b.values())))
            del got
            bar.advance(len(next(iter(b.values()))))
    for l in layers:
        _flush(stats[l.node], pending[l.node], affine.get(l.node))
    return stats, {k: np.concatenate(v) for k, v in kept.items() if v}


def _flush(st: RowStats, rows: list[tuple[np.ndarray, np.ndarray | None]],
           affine: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Add the buffered (X, Y) rows to ``st`` in one product and empty the buffer (Y = X M^T + b
    when the layer's ``affine`` is given)."""
    if rows:
        x = np.concatenate([x for x, _ in rows])
        if affine is None:
            y = np.concatenate([y for _, y in rows])
        else:
            m, b = affine
            y = x @ np.asarray(m, np.float32).T + np.asarray(b, np.float32)
        st.add(x, y)
        rows.clear()
