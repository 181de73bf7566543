"""Calibrate a channel-pruned model toward the dense one: least-squares re-fit of the consumers of
pruned tensors (He et al. 2017; ThiNet), or the relative BN / bias shift (adaptive BN made relative).

Every fit targets the dense model's output of the layer, never the data. The re-fit is first fitted
on the *dense* model's activations (one pass: exact if everything upstream were), then, by default,
again on the activations of the calibrated pruned model itself, in depth order (:mod:`.sequential`),
which is what keeps deep nets from compounding upstream errors. Samples held out of every fit check
the result as a whole: a calibration that moves the outputs away from the dense ones is not used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx

from ..channels.rewrite import validate_plan
from ..channels.types import Analysis, KeepPlan
from ..core.graph import GraphView, attr
from .collect import DEFAULT_ROWS, collect_stats, run
from .edit import ModelEditor, write_layer
from .fisher import mask_gradients as fisher_mask_gradients
from .fit import DEFAULT_RIDGE, as_affine, channel_energy, rel_error, ridge_refit, shift_fit
from .layers import Layer, dense_affine, layer_of
from .guard import is_worse, mean_error, output_errors, rejection
from .mask import mask_input
from .sequential import STAGES, Target, stages, refit as sequential_refit
from .stats import RowStats

METHODS = ("refit", "bn", "none")
#: widest layer (input columns) re-fitted by least squares; wider ones get the shift correction
#: (their d x d statistics would not fit the memory budget)
MAX_FIT_COLUMNS = 8192
#: samples whose graph outputs are compared before and after calibration (two runs of the pruned
#: model: on ResNet-50 64 samples cost a fifth of the whole calibration)
CHECK_SAMPLES = 32


def check_count(n: int) -> int:
    """Samples held out of the fits for the never-worse check: up to :data:`CHECK_SAMPLES`, a quarter
    of the data at most; none below 8 samples (the check then runs on fitted samples and says so)."""
    return 0 if n < 8 else min(CHECK_SAMPLES, n // 4)


def removed_positions(analysis: Analysis, plan: KeepPlan) -> tuple[dict[tuple[str, int], np.ndarray], set[str]]:
    """Removed positions per (constant tensor, axis), and the tensors cut as grouped conv weights."""
    removed = validate_plan(analysis, plan)
    groups = {g.id: g for g in analysis.groups}
    cuts: dict[tuple[str, int], list[np.ndarray]] = {}
    grouped: set[str] = set()
    for gid, rem in removed.items():
        for m in groups[gid].members:
            if m.role == "act":
                continue
            if m.groups > 1:
                grouped.add(m.tensor)
            cuts.setdefault((m.tensor, m.axis), []).append(m.positions.of_channels(rem))
    return {k: np.unique(np.concatenate(v)) for k, v in cuts.items()}, grouped


def consumer_layers(view: GraphView, analysis: Analysis, groups=None) -> tuple[list[Layer], list[dict[str, str]]]:
    """The linear layers reading channels of ``groups`` (default: all prunable) through their weight's
    input axis, and the consumers that cannot be re-fitted (with why)."""
    groups = analysis.prunable if groups is None else groups
    wanted: dict[str, str] = {}
    for g in groups:
        for m in g.members:
            if m.role == "in":
                wanted.setdefault(m.node, m.tensor)
    by_name = {n.name: n for n in view.nodes}
    layers, skipped = [], []
    for name in wanted:
        node = by_name.get(name)
        if node is None:
            continue
        layer, why = layer_of(node, view)
        if layer is not None and len(view.consumers.get(layer.weight, [])) > 1:
            layer, why = None, "its weight is shared with another node"
        if layer is None:
            skipped.append({"node": name, "reason": f"not re-fitted: {why}"})
        else:
            layers.append(layer)
    return layers, skipped


@dataclass
class StructuredCalibration:
    """Calibration of one structured pruning run (``prune_structured(..., calibration=...)``).

    ``inputs``: calibration samples per model input. ``method``: ``refit`` (least squares, the
    default), ``bn`` (relative BN / bias shift only) or ``none`` (statistics and errors only); the
    given method and the simpler ones after it are all tried, and the one whose outputs are closest
    to the dense model's on the check samples is kept (``candidates`` in the summary).
    ``sequential`` (default): the re-fit is fitted on the pruned model's own activations, stage by
    stage (:mod:`.sequential`, at most ``stages`` passes; None: one per depth); False: one pass on
    the dense model's. The last :func:`check_count` samples are held out of every fit: that choice
    (never worse than no calibration) is made on them. ``mask``: the input holding an attention mask
    (default: found by name, see :func:`.mask.mask_input`); padding positions count nowhere."""

    inputs: Mapping[str, np.ndarray]
    method: str = "refit"
    rows: int = DEFAULT_ROWS
    ridge: float = DEFAULT_RIDGE
    seed: int = 0
    progress: bool = False
    sequential: bool = True
    stages: int | None = STAGES
    mask: str | bool | None = None  # None: found by name; False: none; a name: that input
    split: str | None = None  # the data split the samples came from (reported)
    stats: dict[str, RowStats] = field(default_factory=dict)
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def fit_inputs(self) -> dict[str, np.ndarray]:
        n = len(next(iter(self.inputs.values())))
        return {k: v[:n - check_count(n)] for k, v in self.inputs.items()}

    @property
    def check_inputs(self) -> dict[str, np.ndarray]:
        n = len(next(iter(self.inputs.values())))
        h = check_count(n)
        return {k: (v[n - h:] if h else v[:CHECK_SAMPLES]) for k, v in self.inputs.items()}

    def _mask(self, model: onnx.ModelProto) -> str | None:
        return None if self.mask is False else mask_input(model, self.inputs, self.mask or None)

    def _collect(self, view: GraphView, model: onnx.ModelProto, layers: list[Layer]) -> None:
        need = [l for l in layers if l.node not in self.stats]
        if not need:
            return
        t = time.perf_counter()
        shapes = {l.weight: tuple(view.initializers[l.weight].dims) for l in need}
        # layers wider than MAX_FIT_COLUMNS keep only column norms and means
        wide = [l for l in need if _columns(shapes[l.weight], l) > MAX_FIT_COLUMNS]
        narrow = [l for l in need if l not in wide]
        mask = self._mask(model)
        for part, full in ((narrow, True), (wide, False)):
            if part:
                stats, _ = collect_stats(model, self.fit_inputs, part, shapes, full=full, rows=self.rows, seed=self.seed,
                                         progress=self.progress, affine=dense_affine(part, view), mask=mask)
                self.stats.update(stats)
        self.seconds += time.perf_counter() - t

    def channel_energies(self, view: GraphView, model: onnx.ModelProto, analysis: Analysis) -> dict[str, np.ndarray]:
        """``--criterion activation``: per consumer weight, each input channel's contribution to its outputs."""
        layers, _ = consumer_layers(view, analysis)
        self._collect(view, model, layers)
        return {l.weight: channel_energy(self.stats[l.node], l.matrix(view.const(l.weight)), l.taps) for l in layers}

    def mask_gradients(self, view: GraphView, model: onnx.ModelProto, analysis: Analysis) -> dict[str, np.ndarray]:
        """``--criterion fisher``: per weight consuming prunable channels, the label-free mask gradient
        of each input position on every batch of the fit samples (:mod:`.fisher`; needs torch)."""
        weights = {m.tensor: m.axis for g in analysis.prunable for m in g.members
                   if m.role == "in" and m.groups == 1 and m.tensor in view.initializers}
        t = time.perf_counter()
        out = fisher_mask_gradients(model, self.fit_inputs, weights, mask=self._mask(model), seed=self.seed)
        self.seconds += time.perf_counter() - t
        return out

    def apply(self, view: GraphView, dense: onnx.ModelProto, analysis: Analysis, plan: KeepPlan,
              pruned: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """``pruned`` calibrated (a new model) and the ``calibration`` summary entry."""
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, not {self.method!r}")
        t0, collected_before = time.perf_counter(), self.seconds  # (collecting for the criterion came earlier)
        cuts, grouped = removed_positions(analysis, plan)
        layers, skipped = consumer_layers(view, analysis)
        touched = [l for l in layers if (l.weight, l.in_axis) in cuts]
        skipped = [s for s in skipped if any(m.node == s["node"] and (m.tensor, m.axis) in cuts
                                             for g in analysis.groups for m in g.members if m.role == "in")]
        for l in [l for l in touched if l.weight in grouped]:
            touched.remove(l)
            skipped.append({"node": l.node, "reason": "not re-fitted: grouped weight"})
        self._collect(view, dense, touched)
        mask = self._mask(dense)
        check = self.check_inputs
        held_out = check_count(len(next(iter(self.inputs.values())))) > 0
        self.reference = run(dense, check)
        before = run(pruned, check)
        cmask = check.get(mask) if mask else None
        rejected, tried, stage_count = [], [], 0
        for method in METHODS[METHODS.index(self.method):]:  # refit, the shift, nothing: the best on the check
            out, entries, failed = self._edited(pruned, touched, view, cuts, method)
            if method == "refit" and self.sequential and entries:
                out, entries, failed, stage_count = self._sequential(view, dense, out, touched, cuts, entries, failed, mask)
            after = run(out, check) if entries and method != "none" else before
            errors = output_errors(self.reference, before, after, cmask)
            mean_after = mean_error(errors, 1)
            score = mean_after if np.isfinite(mean_after) else float("inf")  # (NaN: from a non-finite fit)
            tried.append((score, len(tried), method, out, entries, failed, errors))
            if is_worse(errors):
                rejected.append(rejection(method, errors, held_out))
        _, _, method, out, entries, failed, errors = min(tried, key=lambda c: c[:2])
        summary: dict[str, Any] = {"method": method, "samples": int(len(next(iter(self.inputs.values())))),
                                   "fit_samples": int(len(next(iter(self.fit_inputs.values())))),
                                   "rows_per_layer": self.rows, "ridge": self.ridge, "layers": entries,
                                   "skipped": skipped + failed}
        if self.split:
            summary["split"] = self.split
        if self.method == "refit":
            summary["fit_on"] = ("the pruned model's activations (sequential)" if self.sequential
                                 else "the dense model's activations (one pass)")
            if self.sequential:
                summary["stages"] = stage_count
        if mask:
            summary["mask"] = mask
        if rejected:
            summary["rejected"] = rejected
        summary["candidates"] = {c[2]: mean_error(c[6], 1) for c in tried}
        summary["outputs"] = {k: {"rel_l2_before": b, "rel_l2_after": a} for k, (b, a) in errors.items()}
        summary["check_samples"] = int(len(next(iter(check.values()))))
        summary["check"] = "held_out" if held_out else "in_sample"
        summary["seconds"] = round(collected_before + time.perf_counter() - t0, 3)
        return out, summary

    def _sequential(self, view: GraphView, dense: onnx.ModelProto, start: onnx.ModelProto, touched: list[Layer], cuts,
                    entries: list[dict[str, Any]], failed: list[dict[str, Any]], mask: str | None):
        """The one-pass re-fit ``start`` re-fitted again layer by layer on its own activations
        (layers the one-pass fit left alone, or gave the shift, stay as they are)."""
        t = time.perf_counter()
        fitted = {e["node"] for e in entries if e.get("method") == "refit"}
        targets = {}
        for l in touched:
            if l.node not in fitted:
                continue
            wdense = view.const(l.weight)
            m = l.matrix(wdense)
            b = np.zeros(m.shape[0]) if l.bias is None else np.asarray(view.const(l.bias), np.float64).reshape(-1) * l.beta
            keep_in = np.setdiff1d(np.arange(wdense.shape[l.in_axis]), cuts.get((l.weight, l.in_axis), []))
            outs = np.setdiff1d(np.arange(m.shape[0]), cuts.get((l.weight, l.out_axis), []))
            shape = tuple(next(i.dims for i in start.graph.initializer if i.name == l.weight))
            targets[l.node] = Target(l, l.columns(keep_in), outs, m, b, shape, wdense.dtype)
        groups = stages(view, [l for l in touched if l.node in targets], self.stages)
        held = check_count(len(next(iter(self.inputs.values()))))
        out, seq, bad = sequential_refit(dense, start, groups, targets, self.fit_inputs, rows=self.rows,
                                         ridge=self.ridge, seed=self.seed, mask=mask, progress=self.progress,
                                         check=self.check_inputs if held else None)
        done = {e["node"] for e in seq}
        kept = [e for e in entries if e["node"] not in done]
        self.seconds += time.perf_counter() - t
        return out, seq + kept, failed + bad, len(groups)

    def _edited(self, pruned: onnx.ModelProto, touched: list[Layer], view: GraphView, cuts,
                method: str) -> tuple[onnx.ModelProto, list[dict[str, Any]], list[dict[str, Any]]]:
        """A copy of ``pruned`` with every touched layer calibrated by ``method``: (model, entries, skipped)."""
        out = onnx.ModelProto()
        out.CopyFrom(pruned)
        ed = ModelEditor(out)
        entries, failed = [], []
        for l in touched:
            entry = self._calibrate_layer(l, view, ed, cuts, method)
            (failed if "reason" in entry else entries).append(entry)
        return out, entries, failed

    def _calibrate_layer(self, l: Layer, view: GraphView, ed: ModelEditor, cuts, method: str) -> dict[str, Any]:
        st = self.stats[l.node]
        wdense = view.const(l.weight)
        m = l.matrix(wdense)
        b = np.zeros(m.shape[0]) if l.bias is None else np.asarray(view.const(l.bias), np.float64).reshape(-1) * l.beta
        keep_in = np.setdiff1d(np.arange(wdense.shape[l.in_axis]), cuts.get((l.weight, l.in_axis), []))
        outs = np.setdiff1d(np.arange(m.shape[0]), cuts.get((l.weight, l.out_axis), []))
        cols = l.columns(keep_in)
        pshape = tuple(ed.inits[l.weight].dims) if l.weight in ed.inits else None
        expect = list(wdense.shape)
        expect[l.in_axis], expect[l.out_axis] = len(keep_in), len(outs)
        if pshape != tuple(expect) or l.node not in ed.nodes:
            return {"node": l.node, "reason": "not re-fitted: the pruned layer is not the dense one sliced"}
        a0 = as_affine(m, b, cols, outs)
        entry = {"node": l.node, "op_type": l.op_type, "error_before": rel_error(st, cols, outs, a0)}
        if method == "refit" and not st.full:
            method = "bn"
            entry["note"] = f"wider than {MAX_FIT_COLUMNS} input columns: shift correction instead of a re-fit"
        if method == "none":
            entry.update(method="none", error_after=entry["error_before"])
            return entry
        if method == "refit":
            info: dict[str, float] = {}
            a, err = ridge_refit(st, cols, outs, self.ridge, prior=a0[:-1], info=info)  # shrink toward the dense weights
            write_layer(ed, l, ed.nodes[l.node], a, pshape, wdense.dtype)
            entry.update(method="refit", error_after=err, **info)
            return entry
        else:
            bn = self._bn_after(l, ed)
            a, r, c = shift_fit(st, cols, outs, a0, scale=bn is not None)
            if bn is not None:
                self._shift_bn(ed, bn, r, c)
                entry.update(method="bn_shift", bn=bn.name)
            else:
                write_layer(ed, l, ed.nodes[l.node], a, pshape, wdense.dtype)
                entry.update(method="bias_shift")
        entry["error_after"] = rel_error(st, cols, outs, a)
        return entry

    @staticmethod
    def _bn_after(l: Layer, ed: ModelEditor) -> onnx.NodeProto | None:
        readers = ed.readers.get(l.y, [])
        if len(readers) == 1 and readers[0].op_type == "BatchNormalization" and all(i in ed.inits for i in readers[0].input[1:5]):
            return readers[0]
        return None

    @staticmethod
    def _shift_bn(ed: ModelEditor, bn: onnx.NodeProto, r: np.ndarray, c: np.ndarray) -> None:
        """BN of ``r * x + c`` expressed as a BN of ``x``: new gamma and beta, statistics unchanged."""
        gamma, beta, mean, var = (ed.array(n).astype(np.float64) for n in bn.input[1:5])

        sigma = np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
        # gamma * (r x + c - mean) / sigma + beta = (gamma r) (x - mean) / sigma + beta + gamma (c + (r - 1) mean) / sigma
        ed.set(bn.input[1], gamma * r)
        ed.set(bn.input[2], beta + gamma * (c + (r - 1) * mean) / sigma)


def _columns(wshape, l: Layer) -> int:
    return int(wshape[1] * int(np.prod(wshape[2:]))) if l.op_type == "Conv" else int(wshape[l.in_axis])
