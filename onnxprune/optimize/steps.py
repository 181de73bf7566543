"""The pieces one candidate is made of, each a thin call into the public onnxprune functions:
latency-aware allocation, calibration, label-free distillation, quantization, interleaved timing
and quality on a split. Where these depend on a detail of another module it is isolated in one
function here (``calibrate_counts``, ``quantize``), so a change there is a change in one place.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.errors import OnnxPruneError
from ..profiling.hw_profile import load_hw_profile
from ..quantization import quantize_model
from .goal import Bound
from ..calibration import calibration_inputs, StructuredCalibration
from ..core.model_io import load_graph
from ..datasets import data_input_shapes
from ..structured.latency_alloc import prune_for_latency
from ..channels.analyze import analyze_channels
from ..core.prepare import prepare
from ..structured.allocate import Limits, select, window_needs
from ..structured.prune import _prune_prepared
from ..training import TrainConfig, finetune
from ..profiling import compare_models
from ..datasets.fidelity import evaluate_outputs

#: calibration samples taken from the data's training split (``prune --calibration-samples``' default)
CALIBRATION_SAMPLES = 256


def calibration_data(data, model_path: str | os.PathLike, samples: int = CALIBRATION_SAMPLES) -> dict[str, np.ndarray]:
    """Unlabeled inputs from the *training* split only: the splits that are scored are never fitted on."""

    train = replace(data, val=None, test=None)
    return calibration_inputs(train, load_graph(model_path), samples)


def measure_shapes(inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, tuple[int, ...]]:
    """The input shapes timed: the data's sample shapes at ``batch`` (fixes symbolic dims)."""

    return data_input_shapes(inputs, batch=batch)


def allocate(dense: Path, hw: str, target: dict[str, float], shapes: Mapping[str, tuple[int, ...]],
             table_cache: Path | None):
    """``prune --structured --target-speedup X`` / ``--target-latency MS`` on the profile."""

    return prune_for_latency(str(dense), hw, input_shapes=dict(shapes), cache=table_cache, **target)


def kept_counts(summary: Mapping[str, Any]) -> dict[int, int]:
    """Kept channels per group id, from a structured prune summary."""
    return {int(g["id"]): int(g["kept"]) for g in summary.get("groups", [])}


def calibrate_counts(dense: Path, counts: Mapping[int, int], summary: Mapping[str, Any], inputs: Mapping[str, np.ndarray],
                     shapes: Mapping[str, tuple[int, ...]]):
    """The allocation's model again (same groups, same kept counts, the same channels chosen by the
    same criterion) with the calibration re-fit toward the dense model applied: latency-aware
    allocation does not take a calibration itself, so its kept counts are replayed through the
    structured pruner's ``plan_of`` hook, which does. Returns a PruneResult (summary ``calibration``)."""

    lim = summary.get("limits") or {}
    limits = Limits(max_ratio=float(lim.get("max_ratio", 0.9)), min_keep=int(lim.get("min_keep", 1)),
                    round_to=int(lim.get("round_to", 1)))
    prep = prepare(str(dense), dict(shapes))
    analysis = analyze_channels(prep.view)

    def plan_of(groups, scores):
        return {g.id: select(scores[g.id], counts.get(g.id, g.size), g.blocks, window_needs(g, limits)) for g in groups}

    res = _prune_prepared(prep, analysis, kind="ratio", value=0.0, criterion=summary.get("criterion", "l1"),
                          scope="global", limits=limits, ignore=(), seed=int(summary.get("seed", 0)), gradients=None,
                          calibration=StructuredCalibration(dict(inputs)), plan_of=plan_of)
    got = kept_counts(res.summary)
    if any(got.get(g, c) != c for g, c in counts.items()):
        raise OnnxPruneError(f"calibration replay kept {got}, the allocation kept {dict(counts)}")
    return res


def distill(source: Path, dense: Path, data, epochs: int, seed: int = 0, output_kinds: Mapping[str, str] | None = None):
    """Label-free distillation from the dense model (``finetune --teacher DENSE --objective distill``);
    the checkpoint is chosen on the val split, the test split is not touched."""

    config = TrainConfig(epochs=int(epochs), objective="distill", seed=seed, train_bn=True)
    model, hist = finetune(str(source), data, config, teacher=str(dense), progress=False, evaluate_test=False,
                           output_kinds=output_kinds)
    return model, {k: hist[k] for k in ("best_epoch", "objective", "seconds") if k in hist}


def quantize(source: Path, output: Path, calibration_spec: Any, hw: str) -> dict[str, Any]:
    """:func:`onnxprune.quantization.quantize_model` (static INT8, or what the profile's backend wants)
    calibrated on the data's train split; its summary."""
    return dict(quantize_model(str(source), str(output), calibration_spec, backend=load_hw_profile(hw).backend))


def measure_speed(dense: Path, path: Path, hw: str, batch: int, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Dense and candidate timed interleaved (D C D C ...) on the profile at ``batch``."""

    res = compare_models(str(dense), str(path), hw, batch_sizes=[batch], input_shapes=dict(shapes))
    c = res["comparisons"][0]
    return {"speedup": c["ratios"]["speedup_p50"], "p50_ms": c["b"]["latency_ms"]["p50"],
            "dense_p50_ms": c["a"]["latency_ms"]["p50"], "batch_size": c["batch_size"], "profile": res.get("profile"),
            "timing": "interleaved p50 (dense, candidate alternating)", "threads": res.get("threads"),
            "provider": res.get("provider")}


def measure_quality(path: Path, dense: Path, data, split: str, bound: Bound) -> dict[str, Any]:
    """Quality of ``path`` on ``split``: ``task`` (top-1 with labels, or the first figure of the
    metric), ``fidelity`` (per output: top-1 agreement for class scores, cosine otherwise; the worst
    output counts) against ``dense``, and ``top1`` when there are labels."""

    r = evaluate_outputs(str(path), data, split, reference=str(dense), metric=bound.metric,
                         output_kinds=bound.output_kinds)
    per = {k: v.get("top1_agreement", v.get("mean_cosine", v.get("cosine"))) for k, v in (r.get("fidelity") or {}).items()}
    out: dict[str, Any] = {"split": split, "samples": r["samples"], "top1": r.get("top1"),
                           "fidelity": min(per.values()) if per else None, "fidelity_per_output": per}
    if bound.metric:
        name, value = next(iter(r["metric"].items()))
        out.update(metric=r["metric"], task=value, task_name=name)
    elif r.get("top1") is not None:
        out.update(task=r["top1"], task_name="top1")
    else:
        out.update(task=None, task_name=None)
    return out
