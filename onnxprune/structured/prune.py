"""``prune_structured``: remove whole channels from an ONNX model (the ``prune --structured`` API).

Pipeline: prepare (load, normalize, concrete shapes) -> channel analysis -> importance per group ->
allocation (a ratio, or a MACs/params target found by search) -> rewrite. The rewrite acts on the
normalized model with its input dims as declared (a dynamic batch stays dynamic); the shape-fixed
copy is used only to analyse and to count MACs.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from ..channels.analyze import analyze_channels
from ..channels.rewrite import _copy_fields, apply_plan
from ..channels.types import Analysis, Group, KeepPlan
from ..core.errors import OnnxPruneError
from ..core.graph import build_view
from ..core.model_io import load_model
from ..core.quantized import refuse_integer_ops
from ..metrics.macs import node_macs, total_macs
from ..metrics.params import parameter_names
from ..core.prepare import Prepared, prepare
from ..core.pruning_result import PruneResult
from ..core.shapes import _SKELETON_MIN_ELEMENTS, fix_input_shapes
from .allocate import Limits, allocate, ignored_groups
from .fallback import ort_load_error, prune_dropping_broken
from .importance import IMPORTANCE, SELF_NORMALIZED, ScoreInputs, score_groups
from .rearrange import rearrange_plan
from .search import find_ratio

SCOPES = ("local", "global")


def _check_args(ratio, target_macs, target_params, criterion, scope, seed) -> tuple[str, float]:
    given = [(k, v) for k, v in (("ratio", ratio), ("macs", target_macs), ("params", target_params)) if v is not None]
    if len(given) != 1:
        raise OnnxPruneError("give exactly one of --ratio, --target-macs, --target-params")
    kind, value = given[0]
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise OnnxPruneError(f"--{'ratio' if kind == 'ratio' else 'target-' + kind} must be a number, got {value!r}") from None
    if kind == "ratio" and not 0.0 <= value < 1.0:
        raise OnnxPruneError(f"--ratio must be in [0, 1) (the fraction of channels removed), got {value:g}")
    if kind != "ratio" and not 0.0 < value <= 1.0:
        raise OnnxPruneError(f"--target-{kind} must be in (0, 1] (the fraction kept, 0.5 = 2x smaller), got {value:g}")
    if criterion not in IMPORTANCE:
        raise OnnxPruneError(f"unknown criterion {criterion!r}; choose from {', '.join(IMPORTANCE)}")
    if scope not in SCOPES:
        raise OnnxPruneError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise OnnxPruneError(f"--seed must be an integer, got {seed!r}")
    return kind, value


def _measure(view) -> tuple[int, int | None]:
    """(params, MACs) of an indexed model; params as :func:`~onnxprune.metrics.params.count_params` counts
    them, read off the initializer dims (no weight is decoded: the target search calls this often)."""
    params = sum(math.prod(view.initializers[n].dims) for n in parameter_names(view))
    return params, total_macs(view)


def _counting_view(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]):
    """The view :func:`_measure` counts on: ``model`` with its inputs fixed to ``shapes``, indexed.

    Counting reads initializer names, types and dims and the inferred shapes, never large weight
    values, so it first runs on a copy whose large float weights carry no data (shape inference
    sees exactly what it sees on the full model: it runs on a weight-free skeleton anyway). Only
    when some MACs need run-time shape arithmetic folded (which may read values) does it index a
    full copy instead."""
    light = onnx.ModelProto()
    _copy_fields(light, model, skip="graph")
    _copy_fields(light.graph, model.graph, skip="initializer")
    out = light.graph.initializer
    for t in model.graph.initializer:
        if math.prod(t.dims) < _SKELETON_MIN_ELEMENTS or t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            out.add().CopyFrom(t)
        else:
            d = out.add()
            d.name = t.name
            d.data_type = t.data_type
            d.dims.extend(t.dims)
    view = build_view(fix_input_shapes(light, shapes), inplace=True) if shapes else build_view(light, inplace=True)
    if all(node_macs(n, view) is not None for n in view.nodes):
        return view
    # (the shape-fixed copy is private: inferred in place; without shapes, build_view copies ``model``)
    return build_view(fix_input_shapes(model, shapes), inplace=True) if shapes else build_view(model)


def _group_entry(g: Group, kept: int | None = None, reason: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": g.id, "nodes": list(g.nodes)}
    if reason is None:
        entry.update(kept=int(g.size if kept is None else kept), total=int(g.size))
        if not g.exact:  # e.g. LayerNorm statistics over these channels: outputs shift, fine-tune after
            entry["inexact"] = g.inexact_reason
    else:
        entry["reason"] = reason
    return entry


def _restore_io(pruned: onnx.ModelProto, original: onnx.ModelProto, io: Mapping[str, int] | None = None) -> None:
    """Declare inputs and outputs exactly as the original file did (in place). Their channels are
    never pruned, but normalization's shape inference may have made symbolic dims concrete. The
    ones ``--allow-io-change`` let go (``io``: name -> channel axis) keep their new size there."""
    io = io or {}
    for declared, current in ((original.graph.input, pruned.graph.input), (original.graph.output, pruned.graph.output)):
        by_name = {v.name: v for v in declared}
        for v in current:
            if v.name not in by_name:
                continue
            ax = io.get(v.name)
            new = v.type.tensor_type.shape.dim
            size = new[ax].dim_value if ax is not None and ax < len(new) and new[ax].HasField("dim_value") else None
            v.CopyFrom(by_name[v.name])
            dims = v.type.tensor_type.shape.dim
            if size is not None and ax < len(dims) and dims[ax].HasField("dim_value"):
                dims[ax].dim_value = size


def validated_builder(prep: Prepared, analysis: Analysis):
    """``plan -> pruned model``, raising :class:`OnnxPruneError` when the result fails strict shape
    inference, the checker (both in :func:`apply_plan`) or an ONNX Runtime load. The load counts
    only when the unpruned model loads (custom-domain ops do not, whatever is pruned)."""
    ort_usable: list[bool] = []

    def build(plan: KeepPlan) -> onnx.ModelProto:
        pruned = apply_plan(prep.model, analysis, plan, values=prep.view.const)  # same weights, decoded once
        _restore_io(pruned, prep.original, analysis.io)
        why = ort_load_error(pruned)
        if why is not None:
            if not ort_usable:
                base = apply_plan(prep.model, analysis, {})
                _restore_io(base, prep.original)
                ort_usable.append(ort_load_error(base) is None)
            if ort_usable[0]:
                raise OnnxPruneError(f"pruned model: {why}")
        return pruned
    return build


def prune_structured(source: str | os.PathLike | onnx.ModelProto, *, ratio: float | None = None,
                     target_macs: float | None = None, target_params: float | None = None,
                     criterion: str = "l1", scope: str = "local", round_to: int = 1, min_keep: int = 1,
                     max_ratio: float = 0.9, ignore: Sequence[str] = (), seed: int = 0,
                     input_shapes: Mapping[str, tuple[int, ...]] | None = None,
                     gradients: Mapping[str, np.ndarray] | None = None, calibration: Any = None,
                     allow_io_change: bool = False, prune_hidden: bool = False,
                     round_columns: bool = False, rearrange: bool = False) -> PruneResult:
    """Prune channels of ``source`` (a path or ModelProto) and return the model and a JSON summary.

    Exactly one target: ``ratio`` (fraction of channels removed per group, or overall with
    ``scope="global"``), ``target_macs`` or ``target_params`` (fraction of MACs/params *kept*,
    reached by searching the ratio). See :mod:`onnxprune.structured.allocate` for the limits.
    ``calibration``: a :class:`onnxprune.calibration.StructuredCalibration` (data-driven criterion
    ``activation`` and re-fit of the pruned model toward the dense one; summary key ``calibration``).
    ``allow_io_change``: KV-cache inputs/outputs no longer fix the heads they carry; every input or
    output whose declared shape changes is listed (summary key ``io_changes``). ``prune_hidden``:
    the hidden size embedding tables start (a transformer's residual stream) is prunable too.
    ``round_columns``: ``round_to`` counts weight columns (a hardware profile's ``channel_multiple``),
    so a head group keeps whole heads whose columns are a multiple of it (summary ``limits``).
    ``rearrange`` (``criterion="fisher"`` only; off by default, as it did not help on the tests'
    encoders): which channels of a group go is re-chosen on the group's whole Fisher matrix, the
    count kept (Kwon et al.'s mask rearrangement, :mod:`.rearrange`; summary key ``mask_rearrangement``).
    """
    kind, value = _check_args(ratio, target_macs, target_params, criterion, scope, seed)
    limits = Limits(max_ratio=float(max_ratio), min_keep=min_keep, round_to=round_to, columns=bool(round_columns))
    if isinstance(ignore, str):
        ignore = (ignore,)
    prep = _prepare_float_or_qdq(source, input_shapes)
    analysis = analyze_channels(prep.view, allow_io_change=allow_io_change, prune_hidden=prune_hidden)
    return _prune_prepared(prep, analysis, kind=kind, value=value, criterion=criterion, scope=scope, limits=limits,
                           ignore=tuple(ignore), seed=int(seed), gradients=gradients, calibration=calibration,
                           rearrange=rearrange)


def _prepare_float_or_qdq(source: str | os.PathLike | onnx.ModelProto,
                          input_shapes: Mapping[str, tuple[int, ...]] | None) -> Prepared:
    """:func:`prepare`, refusing first a model that computes in integer ops (QOperator, dynamic
    quantization): its weights, scales and zero points are fused into them. QDQ models go on."""
    if isinstance(source, onnx.ModelProto):
        refuse_integer_ops(source, "prune --structured")
        return prepare(source, input_shapes)
    loaded = load_model(source)
    refuse_integer_ops(loaded, f"prune --structured {source}")
    prep = prepare(loaded, input_shapes, consume=True)
    prep.path = Path(source)
    return prep


def _io_shapes_after(shapes: Mapping[str, tuple[int, ...]], pruned: onnx.ModelProto,
                     io: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """``shapes`` (the analysed input shapes) with the inputs ``--allow-io-change`` shrank at their
    new size on the channel axis (as the pruned model declares it)."""
    out = dict(shapes)
    for vi in pruned.graph.input:
        ax = io.get(vi.name)
        if ax is None or vi.name not in out:
            continue
        d = vi.type.tensor_type.shape.dim
        if ax < len(d) and d[ax].HasField("dim_value"):
            out[vi.name] = tuple(d[ax].dim_value if i == ax else v for i, v in enumerate(out[vi.name]))
    return out


def io_changes(before: onnx.ModelProto, after: onnx.ModelProto) -> list[dict[str, Any]]:
    """Every model input/output whose declared shape differs between ``before`` and ``after``
    (``--allow-io-change``): ``{"name", "kind": "input"|"output", "before", "after"}``."""
    def declared(vis):
        return {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in vis}

    out = []
    for kind, a, b in (("input", before.graph.input, after.graph.input), ("output", before.graph.output, after.graph.output)):
        old, new = declared(a), declared(b)
        out.extend({"name": n, "kind": kind, "before": old[n], "after": new[n]} for n in old if n in new and old[n] != new[n])
    return out


def _prune_prepared(prep: Prepared, analysis: Analysis, *, kind: str, value: float, criterion: str, scope: str,
                    limits: Limits, ignore: tuple[str, ...], seed: int,
                    gradients: Mapping[str, np.ndarray] | None, calibration: Any = None,
                    plan_of: "Callable[[list[Group], dict[int, np.ndarray]], KeepPlan] | None" = None,
                    rearrange: bool = False) -> PruneResult:
    """``plan_of(groups, scores)``, when given, chooses the kept channels itself (latency-aware
    allocation) instead of the ratio / target search. ``rearrange``: see :func:`prune_structured`."""
    refuse_integer_ops(prep.model, "prune --structured")  # every entry (latency targets, recipes, optimize)
    if rearrange and criterion != "fisher":
        raise OnnxPruneError("--mask-rearrangement re-chooses heads on the Fisher matrix: it needs --criterion fisher")
    notes = list(prep.notes)
    params_before, macs_before = _measure(prep.view)
    if kind == "macs" and not macs_before:
        raise OnnxPruneError("--target-macs needs the model's MACs, which are unknown (a Conv/Gemm/MatMul has no static "
                             "shape): pass --input-shape NAME=DIMS for inputs with symbolic dims, or use --target-params")

    skipped = ignored_groups(analysis.prunable, ignore)
    candidates = [g for g in analysis.prunable if g.id not in skipped]
    activations = None
    if criterion == "activation":
        if calibration is None:
            raise OnnxPruneError("criterion activation needs calibration data: pass --calibrate SPEC")
        activations = calibration.channel_energies(prep.view, prep.model, analysis)
    mask_gradients = None
    if criterion == "fisher":
        if calibration is None:
            raise OnnxPruneError("criterion fisher needs calibration data: pass --calibrate SPEC")
        mask_gradients = calibration.mask_gradients(prep.view, prep.model, analysis)
    score_inputs = ScoreInputs.from_view(prep.view, gradients=gradients, seed=seed, activations=activations,
                                         mask_gradients=mask_gradients)
    scores, unavailable = score_groups(candidates, criterion, score_inputs)
    if candidates and not scores:
        raise OnnxPruneError(f"criterion {criterion} cannot score any group ({next(iter(unavailable.values()))})")
    for gid, why in unavailable.items():
        skipped[gid] = f"criterion {criterion}: {why}; left whole"
    groups = [g for g in candidates if g.id in scores]
    if skipped:
        notes.append(f"{len(skipped)} prunable group(s) left whole (see 'unprunable')")
    if not groups:
        notes.append("no channel group can be pruned: the model is unchanged (see 'unprunable')")

    def plan_for(r: float) -> KeepPlan:
        return allocate(groups, scores, r, scope=scope, limits=limits, self_normalized=criterion in SELF_NORMALIZED)

    by_id = {g.id: g for g in analysis.groups}
    dropped: dict[int, str] = {}
    if kind != "ratio" and groups:  # the search must not measure broken rewrites: find them first
        probe = plan_for(min(limits.max_ratio, 0.99))
        _, dropped = prune_dropping_broken(validated_builder(prep, analysis), probe,
                                           [g.id for g in groups if len(probe[g.id]) < g.size])
        groups = [g for g in groups if g.id not in dropped]

    search = None
    if plan_of is not None:
        plan, used_ratio = plan_of(groups, scores), value
    elif kind == "ratio":
        if value > limits.max_ratio:
            notes.append(f"ratio {value:g} is above the per-group maximum {limits.max_ratio:g}: groups stop there")
        plan, used_ratio = plan_for(value), value
    else:
        before = macs_before if kind == "macs" else params_before
        shaped = prep.view.model  # shape-fixed copy: MACs need concrete shapes

        def measure(p: KeepPlan) -> float:
            params, macs = _measure(build_view(apply_plan(shaped, analysis, p, check=False)))
            return (macs if kind == "macs" else params) / before

        limits_text = f"--max-ratio {limits.max_ratio:g}, --min-keep {limits.min_keep}"
        if limits.round_to > 1:
            limits_text += f", --round-to {limits.round_to}"
        search = find_ratio(plan_for, measure, value, limits.max_ratio, kind=kind, limits_text=limits_text)
        plan, used_ratio = search.plan, search.ratio

    rearranged = None
    if criterion == "fisher":
        rearranged = {"enabled": bool(rearrange), "groups_changed": []}
        if rearrange:
            changed = rearrange_plan(groups, plan, score_inputs)
            plan = {**plan, **changed}
            rearranged["groups_changed"] = sorted(changed)
    build = validated_builder(prep, analysis)
    pruned, more = prune_dropping_broken(build, plan, [g.id for g in groups if len(plan[g.id]) < g.size])
    dropped.update(more)
    for gid in more:
        plan[gid] = np.arange(by_id[gid].size)
    if dropped:
        notes.append(f"{len(dropped)} group(s) left whole because pruning them breaks the model (see 'dropped_groups'); "
                     "the others are pruned")
    calibrated = None
    if calibration is not None:
        pruned, calibrated = calibration.apply(prep.view, prep.model, analysis, plan, pruned)
    after_view = _counting_view(pruned, _io_shapes_after(prep.concrete_shapes, pruned, analysis.io))
    params_after, macs_after = _measure(after_view)

    inexact = [g.id for g in groups if not g.exact and len(plan[g.id]) < g.size]
    if inexact:
        notes.append(f"{len(inexact)} pruned group(s) are normalized over their channels (LayerNorm/GroupNorm): "
                     "outputs change beyond the removed channels' contributions; fine-tune after pruning")
    changed_io = io_changes(prep.model, pruned) if analysis.io else []
    if changed_io:
        notes.append(f"--allow-io-change: {len(changed_io)} model input(s)/output(s) change shape, feed and read them "
                     "at their new sizes: " + "; ".join(f"{c['kind']} {c['name']} {c['before']} -> {c['after']}"
                                                         for c in changed_io))
    target: dict[str, Any] = {"kind": kind, "value": value}
    if kind != "ratio":
        achieved = (macs_after / macs_before) if kind == "macs" else (params_after / params_before)
        target.update(achieved=achieved, ratio=used_ratio, evaluations=search.evaluations)
        notes.append(f"target {kind} {value:g} of the original: achieved {achieved:.4f} at ratio {used_ratio:.4f}")
    summary: dict[str, Any] = {
        "method": "structured",
        "criterion": criterion,
        "scope": scope,
        "target": target,
        "limits": {"max_ratio": limits.max_ratio, "min_keep": limits.min_keep, "round_to": limits.round_to,
                   "round_columns": limits.columns},
        "seed": seed,
        "input_shapes": {k: list(v) for k, v in prep.concrete_shapes.items()},
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_reduction": (macs_before / macs_after) if macs_before and macs_after else None,
        "params_reduction": (params_before / params_after) if params_after else None,
        "channels_before": sum(g.size for g in groups if g.id not in dropped),
        "channels_after": sum(len(plan[g.id]) for g in groups if g.id not in dropped),
        "groups": [_group_entry(g, len(plan[g.id])) for g in groups if g.id not in dropped],
        **({"io_changes": changed_io} if analysis.io else {}),
        "unprunable": [_group_entry(g, reason=g.reason or "unprunable") for g in analysis.unprunable]
        + [_group_entry(by_id[gid], reason=why) for gid, why in skipped.items()]
        + [_group_entry(by_id[gid], reason=f"pruning it breaks the model: {why}") for gid, why in dropped.items()],
        "dropped_groups": [_group_entry(by_id[gid], reason=why) for gid, why in dropped.items()],
        "notes": notes,
    }
    if calibrated is not None:
        summary["calibration"] = calibrated
    if rearranged is not None:
        summary["mask_rearrangement"] = rearranged
    return PruneResult(model=pruned, summary=summary)
