"""Calibration for unstructured and N:M pruning: wanda scores and OBS-style reconstruction.

- :func:`input_norms`: per prunable weight, the L2 norm of each input channel's activations on the
  data, shaped to broadcast against the weight (wanda: ``|W| * ||X_j||``, Sun et al. 2023).
- :func:`reconstruct`: given the pruned weights' zero pattern, update each layer's remaining weights
  (and its bias) so that its output on the dense model's inputs matches the dense output: per output
  row, least squares on its kept inputs (the OBS optimum for a fixed mask), or for very wide layers
  one sweep of OBS updates with the inverse Hessian's Cholesky factor as SparseGPT does (Frantar &
  Alistarh 2023). Pruned weights stay exactly zero.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..core.graph import GraphView, attr
from ..core.progress import ProgressBar
from ..core.runtime import fixed_batch, run_batches
from .collect import DEFAULT_ROWS, collect_stats, run, session, with_outputs
from .edit import ModelEditor, write_layer
from .fit import rel_error
from .layers import dense_affine, layer_of
from .guard import is_worse, output_errors, rejection
from .structured import CHECK_SAMPLES, check_count
from ..core.prepare import prepare
from ..sparsity.select import select_weights

#: damping of the Hessian, relative to each diagonal entry (scale-invariant: input channels of very
#: different scales are damped alike; SparseGPT damps 1% of the mean diagonal)
DAMP = 0.01


def input_norms(view: GraphView, model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], weights: Sequence[str],
                *, progress: bool = False) -> dict[str, np.ndarray]:
    """For each weight name, ``||X_j||_2`` of the input channel each weight entry reads, broadcastable
    to the weight: Conv/ConvTranspose channels on axis 1 of the input, Gemm/MatMul features on the
    reduction axis. One ONNX Runtime pass over ``inputs``."""
    plan = {}
    for name in weights:
        node = next((n for n in view.consumers.get(name, []) if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")), None)
        if node is None:
            continue
        if node.op_type == "MatMul" and node.input[0] == name:
            plan[name] = (node, node.input[1], -2)  # W @ x: x's rows are the reduction
        else:
            plan[name] = (node, node.input[0], 1 if node.op_type.startswith("Conv") else -1)
    tensors = list(dict.fromkeys(x for _, x, _ in plan.values()))
    feeds = {i.name for i in model.graph.input}
    fetched = [t for t in tensors if t not in feeds]
    sess = session(with_outputs(model, fetched))
    sums: dict[str, np.ndarray] = {}
    n = len(next(iter(inputs.values())))
    with ProgressBar(n, "calibration: activation norms", enabled=progress, transient=True) as bar:
        for b, outs in run_batches(sess, fetched, inputs, 16, fixed_batch(model)):
            got = {**b, **outs}
            for t, v in ((t, got[t]) for t in tensors):
                sq = np.square(np.asarray(v, np.float64))
                for a in {a for _, x, a in plan.values() if x == t}:
                    other = tuple(i for i in range(sq.ndim) if i != a % sq.ndim)
                    sums[(t, a)] = sums.get((t, a), 0) + sq.sum(axis=other)
            bar.advance(len(next(iter(b.values()))))
    out = {}
    for name, (node, x, a) in plan.items():
        out[name] = _broadcast(np.sqrt(sums[(x, a)]), node, name, tuple(view.initializers[name].dims))
    return out


def _broadcast(norms: np.ndarray, node: onnx.NodeProto, weight: str, wshape: tuple[int, ...]) -> np.ndarray:
    """Channel norms laid out along the weight's input-channel axis."""
    op = node.op_type
    if op == "Conv":
        g = int(attr(node, "group", 1))
        per = wshape[1]
        rows = np.arange(wshape[0]) // (wshape[0] // g)  # conv group of each output row
        return norms[rows[:, None] * per + np.arange(per)[None, :]].reshape(wshape[:2] + (1,) * (len(wshape) - 2))
    if op == "ConvTranspose":
        return norms.reshape((-1,) + (1,) * (len(wshape) - 1))
    if op == "Gemm":
        return norms[None, :] if attr(node, "transB", 0) else norms[:, None]
    if node.input[1] == weight:
        return norms[:, None]  # x @ W: W [.., K, N]
    return norms[None, :]  # W @ x: W [.., M, K]


#: above this many flops (rows x kept columns cubed) the exact per-row solve gives way to the sweep
EXACT_FLOPS = 2e10


def refit_rows(m: np.ndarray, keep: np.ndarray, h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Weights ``m`` [out, d] (bias last, always kept) re-fitted under the zero pattern ``keep``:
    each row's kept entries solve ``min ||Z (w - w')||^2 + damp ||w' - w||^2`` exactly (normal
    equations on its kept columns) when that is affordable, else :func:`obs_update`'s one-sweep
    approximation. The damping pulls toward the kept weights as they are (the magnitude-pruned
    layer), not toward zero: the fit is then never worse than no fit on the data, and a column the
    data never excites keeps its weight."""
    counts = keep.sum(1)
    if float(np.sum(counts.astype(np.float64) ** 3)) > EXACT_FLOPS:
        return obs_update(m, keep, h, damp)
    h = np.array(h, dtype=np.float64)
    w = np.asarray(m, np.float64)
    diag = np.diag(h).copy()
    lam = np.where(diag > 0, diag * damp, 1.0)
    target = w @ h + lam * w  # row r: (H w_r)^T + lam * w_r
    h[np.arange(len(diag)), np.arange(len(diag))] = diag + lam
    out = np.zeros_like(target)
    for r in range(len(m)):
        k = np.flatnonzero(keep[r])
        try:
            out[r, k] = np.linalg.solve(h[np.ix_(k, k)], target[r, k])
        except np.linalg.LinAlgError:
            out[r, k] = np.linalg.lstsq(h[np.ix_(k, k)], target[r, k], rcond=None)[0]
    return out


def obs_update(m: np.ndarray, keep: np.ndarray, h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Weights ``m`` [out, d] (bias as the last column, always kept) with entries outside ``keep``
    removed and the kept ones updated to minimize ``||Z (m - m')^T||^2`` for the Hessian ``h = Z^T Z``:
    one left-to-right sweep of OBS updates with the upper Cholesky factor of ``h^-1`` (SparseGPT with a
    fixed mask). Removed entries are exactly zero."""
    d = h.shape[0]
    h = np.array(h, dtype=np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[np.arange(d), np.arange(d)] = np.where(dead, 1.0, diag * (1 + damp))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: hinv = U^T U
    w = np.array(m, dtype=np.float64)
    for j in range(d):
        col = w[:, j]
        q = np.where(keep[:, j], col, 0.0)
        err = (col - q) / hinv[j, j]
        if j + 1 < d and np.any(err):
            w[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
        w[:, j] = q
    return w


def reconstruct(view: GraphView, dense: onnx.ModelProto, pruned: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                weights: Sequence[str], *, rows: int = DEFAULT_ROWS, seed: int = 0,
                progress: bool = False) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``pruned`` (same graph as ``dense`` or the input it was normalized from, with some of ``weights``
    zeroed) with every pruned layer's remaining weights and bias re-fitted toward the dense outputs;
    and the ``calibration`` summary entry (errors per layer before/after, on the sampled rows)."""
    t0 = time.perf_counter()
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    ed = ModelEditor(out)
    layers, skipped = [], []
    for name in weights:
        readers = view.consumers.get(name, [])
        if len(readers) != 1:
            skipped.append({"node": readers[0].name if readers else name, "reason": "weight shared by several nodes"})
            continue
        layer, why = layer_of(readers[0], view)
        if layer is None:
            skipped.append({"node": readers[0].name, "reason": f"not reconstructed: {why}"})
        elif name not in ed.inits or len(ed.readers.get(name, [])) != 1:
            skipped.append({"node": readers[0].name, "reason": "not reconstructed: weight not found in the pruned model"})
        else:
            layers.append(layer)
    shapes = {l.weight: tuple(view.initializers[l.weight].dims) for l in layers}
    total = len(next(iter(inputs.values())))
    held = check_count(total)  # samples the fit never sees: the never-worse check runs on them
    fit = {k: v[:total - held] for k, v in inputs.items()}
    check = {k: (v[total - held:] if held else v[:CHECK_SAMPLES]) for k, v in inputs.items()}
    stats, _ = collect_stats(dense, fit, layers, shapes, rows=rows, seed=seed, progress=progress,
                             affine=dense_affine(layers, view))
    ref = run(dense, check)
    entries = []
    for l in layers:
        st = stats[l.node]
        wp = ed.array(l.weight)
        mp = l.matrix(wp)
        bias = np.zeros(mp.shape[0]) if l.bias is None else np.asarray(view.const(l.bias), np.float64).reshape(-1) * l.beta
        keep = np.concatenate([mp != 0, np.ones((mp.shape[0], 1), bool)], axis=1)
        if keep.all():
            continue
        cols, outs = np.arange(st.d), np.arange(st.out)
        before = rel_error(st, cols, outs, np.vstack([mp.T, bias[None, :]]))
        new = refit_rows(np.concatenate([l.matrix(view.const(l.weight)), bias[:, None]], axis=1), keep, st.s)
        new[:, :-1][mp == 0] = 0.0
        entries.append({"node": l.node, "op_type": l.op_type, "method": "reconstruct", "error_before": before,
                        "error_after": rel_error(st, cols, outs, new.T)})
        node = ed.readers[l.weight][0]
        write_layer(ed, l, node, new.T, wp.shape, wp.dtype)
    summary: dict[str, Any] = {"method": "reconstruct", "samples": int(len(next(iter(inputs.values())))),
                               "rows_per_layer": rows, "layers": entries, "skipped": skipped}
    if ref:
        n = len(next(iter(ref.values())))
        before, after = run(pruned, check), run(out, check)
        errors = output_errors(ref, before, after)
        if is_worse(errors):  # as a whole: never worse (nor NaN)
            out = pruned
            summary.update(method="none", rejected=[rejection("reconstruct", errors, bool(held))])
            errors = {k: (b, b) for k, (b, _) in errors.items()}
        summary["outputs"] = {k: {"rel_l2_before": b, "rel_l2_after": a} for k, (b, a) in errors.items()}
        summary.update(check_samples=n, check="held_out" if held else "in_sample", fit_samples=total - held)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return out, summary


class WeightCalibration:
    """``prune --unstructured/--nm ... --calibrate SPEC``: the dense model prepared once, its wanda
    norms and the reconstruction of a pruned copy."""

    def __init__(self, source, inputs: Mapping[str, np.ndarray], *, progress: bool = False, seed: int = 0):
        self.prep = prepare(source)
        self.inputs = inputs
        self.progress = progress
        self.seed = seed
        self.weights = [p.weight for p in select_weights(self.prep.view)[0]]

    def norms(self) -> dict[str, np.ndarray]:
        return input_norms(self.prep.view, self.prep.model, self.inputs, self.weights, progress=self.progress)

    def reconstruct(self, pruned: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
        return reconstruct(self.prep.view, self.prep.model, pruned, self.inputs, self.weights, seed=self.seed,
                           progress=self.progress)
