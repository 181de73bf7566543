"""Public API of weight-level pruning: :func:`prune_unstructured` and :func:`prune_nm`.

Both take a path or a ``ModelProto``, never modify it, and return a :class:`PruneResult` whose
model has the selected weights zeroed (nothing else changes: when every pruned weight is an
initializer of the input model, the input graph is kept as is; otherwise the normalized graph is
returned) and whose summary is the ``onnxprune prune --json`` object.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..core.quantized import quantization_kind, refuse_integer_ops
from ..core.errors import OnnxPruneError
from ..report.guidance import speedup_guidance
from ..core.model_io import load_model, without_initializers
from ..metrics.params import count_params
from ..core.prepare import Prepared, prepare
from ..core.pruning_result import PruneResult
from .allocate import floors, global_masks, layer_masks
from .nm import nm_ineligible_reason, nm_keep_mask, satisfies_nm
from .scores import CRITERIA, score_weights, wanda_products
from .select import Prunable, select_weights
from .storage import densify, serialized_sizes, to_sparse_storage

SCOPES = ("global", "layer")

Source = str | os.PathLike | onnx.ModelProto


def prune_unstructured(source: Source, *, sparsity: float, scope: str = "global", min_threshold: float = 0.0,
                       criterion: str = "magnitude", exclude_first: bool = False, exclude_last: bool = False,
                       ignore: Iterable[str] = (), seed: int = 0, gradients: Mapping[str, np.ndarray] | None = None,
                       sparse_storage: bool = False, backend: str = "ort-cpu",
                       gpu_compute_capability: float | str | None = None, measure_size: bool = True,
                       input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                       activations: Mapping[str, np.ndarray] | None = None) -> PruneResult:
    """Zero the fraction ``sparsity`` of the prunable weights with the lowest ``criterion`` scores.

    ``scope="global"`` ranks all prunable weights together (``min_threshold``: every layer keeps at
    least that fraction of its weights, the others absorb the rest of the target); ``"layer"`` prunes
    the same fraction of every layer. ``sparsity`` is over the prunable weights; the summary also
    states it over all parameters. ``measure_size=False`` leaves ``file_bytes``/``gzip_bytes`` as None
    (the CLI measures the written file instead of gzipping twice). ``input_shapes`` (``--input-shape``)
    fixes symbolic input dims for the analysis, as in every command that reads a model; the written
    model keeps its declared inputs.
    """
    sparsity = _fraction(sparsity, "sparsity", upper_open=True)
    min_threshold = _fraction(min_threshold, "min_threshold")
    if scope not in SCOPES:
        raise OnnxPruneError(f"unstructured scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if criterion not in CRITERIA:
        raise OnnxPruneError(f"unknown unstructured criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if criterion == "magnitude_x_gradient" and gradients is None:
        raise OnnxPruneError("criterion magnitude_x_gradient needs gradients: pass --data SPEC")
    inp, p = _prepare(source, input_shapes)
    prunable, excluded = select_weights(p.view, exclude_first=exclude_first, exclude_last=exclude_last, ignore=ignore)
    _require(prunable, excluded)
    weights = [p.view.const(w.weight) for w in prunable]
    scores = score_weights(criterion, prunable, weights, seed=int(seed), gradients=gradients, activations=activations)
    if scope == "global":
        keeps = global_masks(scores, sparsity, min_threshold)
    else:
        keeps = layer_masks(scores, sparsity, min_threshold)
    del scores  # each of these is as large as the model: drop it once used
    new = [np.where(k, w, np.zeros((), dtype=w.dtype)) for k, w in zip(keeps, weights)]
    del keeps
    nonzero_before = _release(p, weights)
    summary: dict[str, Any] = {
        "method": "unstructured", "criterion": criterion, "scope": scope, "min_threshold": min_threshold,
        "seed": int(seed), "target_sparsity": sparsity,
    }
    floor_by_weight = dict(zip((pw.weight for pw in prunable), floors([pw.size for pw in prunable], min_threshold)))
    layers = [dict(_layer_entry(pw, a), **({"min_kept": floor_by_weight[pw.weight]} if min_threshold > 0 else {}))
              for pw, a in zip(prunable, new)]
    notes: list[str] = []
    if scope == "global" and min_threshold == 0:
        collapsed = [layer["node"] for layer in layers if not layer["nonzero"]]
        if collapsed:
            notes.append(f"{len(collapsed)} layer(s) lost every weight ({', '.join(collapsed[:5])}); the model's output "
                         "no longer depends on them: use --min-threshold to keep a floor per layer")
    replaced = {pw.weight: a for pw, a in zip(prunable, new)}
    del new
    model = _write_weights(inp, p, replaced)
    return _finish(model, p, prunable, nonzero_before, summary, layers, excluded, [], notes, sparse_storage,
                   speedup_guidance("unstructured", backend, gpu_compute_capability), measure_size,
                   target_zeros=sparsity * sum(pw.size for pw in prunable))


def prune_nm(source: Source, *, n: int, m: int, exclude_first: bool = False, exclude_last: bool = False,
             ignore: Iterable[str] = (), sparse_storage: bool = False, backend: str = "ort-cpu",
             gpu_compute_capability: float | str | None = None, measure_size: bool = True,
             input_shapes: Mapping[str, tuple[int, ...]] | None = None,
             activations: Mapping[str, np.ndarray] | None = None) -> PruneResult:
    """Keep the ``n`` largest-magnitude weights in every run of ``m`` along each weight's reduction axis
    (with ``activations``, the ``n`` largest wanda scores ``|w| * ||X_j||``: see :func:`scores.wanda`).

    Layers whose reduction length is not a multiple of ``m`` stay dense and are listed in ``skipped``.
    """
    n, m = _nm_values(n, m)
    inp, p = _prepare(source, input_shapes)
    prunable, excluded = select_weights(p.view, exclude_first=exclude_first, exclude_last=exclude_last, ignore=ignore)
    _require(prunable, excluded)
    weights = [p.view.const(w.weight) for w in prunable]
    new, skipped, layers = [], [], []
    for pw, w in zip(prunable, weights):
        why = nm_ineligible_reason(pw, m)
        if why is None:
            ranked = w if activations is None else wanda_products([w], prunable=[pw], activations=activations)[0]
            a = np.where(nm_keep_mask(ranked, n, m, pw.reduction_axis), w, np.zeros((), dtype=w.dtype))
        else:
            a = w
            skipped.append({"node": pw.node, "weight": pw.weight, "reason": why})
        new.append(a)
        layers.append(dict(_layer_entry(pw, a), nm_ok=why is None and satisfies_nm(a, n, m, pw.reduction_axis)))
    nonzero_before = _release(p, weights)
    replaced = {pw.weight: a for pw, a, s in zip(prunable, new, layers) if s["nm_ok"]}
    del new
    model = _write_weights(inp, p, replaced)
    eligible = [(pw, s) for pw, s in zip(prunable, layers) if s["nm_ok"]]
    eligible_size = sum(pw.size for pw, _ in eligible)
    eligible_zeros = sum(pw.size - s["nonzero"] for pw, s in eligible)
    summary: dict[str, Any] = {
        "method": "nm", "criterion": "magnitude" if activations is None else "wanda", "scope": "group", "pattern": f"{n}:{m}", "n": n, "m": m,
        "target_sparsity": 1 - n / m,
        "achieved_sparsity_eligible": eligible_zeros / eligible_size if eligible_size else 0.0,
    }
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} layer(s) cannot take the {n}:{m} pattern and stay dense (see skipped)")
    return _finish(model, p, prunable, nonzero_before, summary, layers, excluded, skipped, notes, sparse_storage,
                   speedup_guidance("nm", backend, gpu_compute_capability, nm=(n, m)), measure_size,
                   target_zeros=(1 - n / m) * eligible_size)


def parse_nm(spec: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; anything else (or N >= M) raises :class:`OnnxPruneError`."""
    parts = str(spec).strip().split(":")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise OnnxPruneError(f"--nm expects N:M with integers, e.g. 2:4, not {spec!r}")
    return _nm_values(int(parts[0]), int(parts[1]))


# --------------------------------------------------------------------------------------------- helpers

def _nm_values(n: int, m: int) -> tuple[int, int]:
    if isinstance(n, bool) or isinstance(m, bool) or int(n) != n or int(m) != m:
        raise OnnxPruneError(f"N:M needs integers, not {n!r}:{m!r}")
    n, m = int(n), int(m)
    if not (1 <= n < m):
        raise OnnxPruneError(f"N:M needs 1 <= N < M (keep N of every M), not {n}:{m}")
    return n, m


def _fraction(value: Any, name: str, *, upper_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise OnnxPruneError(f"{name} must be a number, not {value!r}") from exc
    if not (0.0 <= v < 1.0 if upper_open else 0.0 <= v <= 1.0):  # NaN fails both
        raise OnnxPruneError(f"{name} must be in [0, 1{')' if upper_open else ']'}, not {value!r}")
    return v


@dataclass
class _Input:
    """What writing the pruned weights back into the input graph needs: that graph without its
    weights, its initializers' names in order, and where their tensors are. A file's own model is
    normalized in place, so its weights are read from the normalized model (normalization keeps a
    kept initializer's name and values) instead of being held twice; the few it dropped (dead, or
    folded into constants) are read from the file again."""

    graph: onnx.ModelProto
    names: list[str]
    tensors: Mapping[str, onnx.TensorProto]
    path: Path | None = None

    def missing(self, names: Iterable[str]) -> dict[str, onnx.TensorProto]:
        """The tensors of ``names`` that ``tensors`` lacks, from the file."""
        wanted = [n for n in names if n not in self.tensors]
        if not wanted:
            return {}
        if self.path is None:
            raise OnnxPruneError(f"internal: initializers {wanted[:3]} of the input model are gone")
        return {t.name: t for t in densify(load_model(self.path)).graph.initializer if t.name in wanted}


def _refuse_quantized(model: onnx.ModelProto, what: str) -> None:
    """Integer-op models (:func:`refuse_integer_ops`) and QDQ models: zeroing int8 weights after
    quantization leaves scales calibrated on the dense weights and gains nothing on int8 kernels,
    so the way out is the same: prune the float model, then quantize."""
    refuse_integer_ops(model, what)
    q = quantization_kind(model)
    if q is not None:
        raise OnnxPruneError(f"{what}: the model is {q['label']}: unstructured and N:M pruning of quantized weights is "
                             "not supported (the scales were calibrated on the dense weights): prune the float model, "
                             "then run onnxprune quantize (prune --structured does prune QDQ models)")


def _prepare(source: Source, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[_Input, Prepared]:
    """The input model (sparse initializers densified) and its prepared view; integer-quantized
    models are refused (their weights are fused into integer ops)."""
    if isinstance(source, onnx.ModelProto):
        _refuse_quantized(source, "pruning")
        original = densify(source)
        inits = original.graph.initializer
        return _Input(without_initializers(original), [t.name for t in inits], {t.name: t for t in inits}), \
            prepare(original, input_shapes)
    loaded = densify(load_model(source))
    _refuse_quantized(loaded, f"{source}")
    inp = _Input(without_initializers(loaded), [t.name for t in loaded.graph.initializer], {}, Path(source))
    p = prepare(loaded, input_shapes, consume=True)
    del loaded
    inp.tensors = {t.name: t for t in p.model.graph.initializer}
    return inp, p


def _require(prunable: list[Prunable], excluded: list[dict[str, str]]) -> None:
    if not prunable:
        extra = f" ({len(excluded)} excluded by --exclude-first/--exclude-last/--ignore)" if excluded else ""
        raise OnnxPruneError("no prunable weights: the model has no Conv/ConvTranspose/Gemm/MatMul with a constant "
                             f"floating-point weight{extra}")


def _release(p: Prepared, weights: list[np.ndarray]) -> list[int]:
    """Nonzero counts of the weights before pruning; then the decoded weights are dropped (the
    caller's list is emptied, and the view's cache), so a large model's old and new weights are not
    all held while the output is written."""
    counts = [int(np.count_nonzero(w)) for w in weights]
    weights.clear()
    p.view.forget_arrays()
    return counts


def _write_weights(inp: _Input, p: Prepared, new: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the input graph with the weights ``new`` replaced, or of the normalized graph when some
    weight is not an initializer of the input (a Constant node or a folded subgraph).

    ``new`` is consumed: each array is dropped once encoded, so it is never held twice."""
    names = set(inp.names)
    use_input = all(name in names and name in inp.tensors and tuple(inp.tensors[name].dims) == arr.shape
                    and inp.tensors[name].data_type == p.view.initializers[name].data_type
                    for name, arr in new.items())
    if use_input:
        out, order, tensors = without_initializers(inp.graph), inp.names, {**inp.tensors, **inp.missing(inp.names)}
    else:
        out, order = without_initializers(p.model), [t.name for t in p.model.graph.initializer]
        tensors = {t.name: t for t in p.model.graph.initializer}
    for name in order:  # each weight once: a replaced one is never copied first
        out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(new.pop(name)), name)
                                     if name in new else tensors[name])
    return out


def _layer_entry(pw: Prunable, a: np.ndarray) -> dict[str, Any]:
    nnz = int(np.count_nonzero(a))
    return {"node": pw.node, "weight": pw.weight, "op_type": pw.op_type, "shape": list(pw.shape), "size": pw.size,
            "nonzero": nnz, "sparsity": 1 - nnz / pw.size if pw.size else 0.0}


def _finish(model: onnx.ModelProto, p: Prepared, prunable: list[Prunable], nonzero_before: list[int],
            summary: dict[str, Any], layers: list[dict[str, Any]],
            excluded: list[dict[str, str]], skipped: list[dict[str, str]], notes: list[str], sparse_storage: bool,
            guidance: list[str], measure_size: bool, *, target_zeros: float) -> PruneResult:
    """Counts over the prunable weights (``nonzero_before`` them; ``layers`` after) and all parameters,
    storage and sizes, into ``summary``. ``target_zeros``: how many weights the target asked to zero
    (for the all-params target)."""
    params, nonzero_all = count_params(p.view)
    nonzero = nonzero_all - (sum(nonzero_before) - sum(layer["nonzero"] for layer in layers))
    prunable_size = sum(pw.size for pw in prunable)
    prunable_zeros = prunable_size - sum(layer["nonzero"] for layer in layers)
    storage, moved = "dense", []
    if sparse_storage:
        model, moved, storage_notes = to_sparse_storage(model, [pw.weight for pw in prunable])
        notes.extend(storage_notes)
        storage = "sparse" if moved else "dense"
    fbytes, gz = serialized_sizes(model) if measure_size else (None, None)
    summary.update({
        "achieved_sparsity": prunable_zeros / prunable_size if prunable_size else 0.0,
        "prunable_params": prunable_size,
        "target_sparsity_all_params": target_zeros / params if params else 0.0,
        "sparsity_all_params": 1 - nonzero / params if params else 0.0,
        "compression_ratio": params / nonzero if nonzero else None,
        "params": params,
        "nonzero_params": nonzero,
        "layers": layers,
        "excluded": excluded,
        "skipped": skipped,
        "storage": storage,
        "sparse_initializers": moved,
        "file_bytes": fbytes,
        "gzip_bytes": gz,
        "input_shapes": {k: list(v) for k, v in p.concrete_shapes.items()},
        "notes": notes,
        "guidance": guidance,
    })
    return PruneResult(model=model, summary=summary)
