"""``report.json``: the versioned, documented result of ``onnxprune run`` (schema version 1).

Top level::

    schema_version      1 (an integer; bumped on any incompatible change)
    tool                {name, version}
    created             UTC time, ISO 8601
    recipe              {name, description, source, overrides, config}   config = the validated recipe after --set
    model               the input model: {path, sha256, params, nonzero_params, macs, file_bytes, gzip_bytes}
    data                the dataset (load_dataset(...).describe()) or null when the run had no data
    retraining          the ONE retraining config every method got (fairness), or null when epochs = 0:
                        {config (TrainConfig without the seed), distillation, finetune_dense, schedule_split,
                         checkpoint_selection, test_evaluation}
    hw_profiles         [{name, backend, precision, provenance, source, batch_sizes, description}]
    dense               Point: the input model evaluated and profiled as is (the control)
    dense_finetuned     Point or null: the dense model fine-tuned with the same budget (retrain.finetune_dense)
    points              [Point]: one per method x operating point, seeds aggregated
    pareto              {profile: [point ids on the accuracy-vs-latency Pareto front, dense included; latency =
                         dense p50 / speedup timed interleaved with the dense model]}
    sensitivity         null or {kind, criterion, ratios, baseline_top1, csv, rows [{group, nodes, channels,
                         ratio, top1, drop, latency_ms {profile: p50}}], per_layer_ratios {group: ratio},
                         measured_on {profile: measured_on record} when latency was measured}
    guidance            [statements on what will and will not get faster, e.g. unstructured on CPU]
    plots               {name: path relative to the run directory}
    notes               [str]
    versions            {python, platform, onnx, onnxruntime, numpy, torch, ...}
    steps               {executed, skipped}: what this invocation ran vs. took from state.json

A Point::

    id, method, kind (dense | structured | unstructured | nm | mixed), settings {target, stages, schedule},
    seeds [int], models [paths relative to the run directory, one per seed],
    params, nonzero_params, sparsity, compression_ratio (dense params / nonzero params),
    macs (executed by dense kernels), nonzero_macs (MACs of nonzero weights), theoretical_speedup
    (dense MACs / nonzero MACs), macs_reduction (dense MACs / macs), file_bytes, gzip_bytes (null
    unless a point has unstructured/N:M stages, or is the dense control of a run with such points),
    accuracy {val|test: {top1: Stat, top5: Stat | null, samples}}   Stat = {mean, std, n, values}
             (+ mean_rel_l2, top1_agreement: Stat, fidelity to the dense model with unlabeled data;
              + metric {name: Stat} with the recipe's evaluation.metric)
    profiles {profile: [Measurement, one per batch size]}
    runs [{seed, model, accuracy {split: {top1, top5}}, prune {summary figures}, train {...} or null}]
    notes [str]
    quantized   Point or null: with the recipe's ``quantize:``, this point's quantized twin (id ``<id>-int8``
                or ``<id>-fp16``, models ``models/<run>-int8.onnx``): its own file_bytes, accuracy and
                profiles (speedup_vs_dense against the dense float control, like every point); params and
                MACs are the float model's (the same weights in fewer bits). Its Measurements add
                speedup_vs_float (float p50 / quantized p50, timed interleaved with its own float model),
                speedup_vs_float_timing, speedup_vs_float_measured_on.
    quantization  (on a twin only) {format, per_channel, method, why, calibration {method, samples,
                check_samples, held_out}, quantized_ops, float_point, float_file_bytes, size_ratio,
                fidelity {reference, held_out, samples, mean_rel_l2: Stat, top1_agreement: Stat | null}
                (to the float model, on training samples not calibrated on), faster {profile: bool | null}
                (speedup_vs_float at the first batch size >= 1.03), seconds}; a twin that is not faster says
                so in its notes and in the report's guidance

A Measurement (means over seeds of what :func:`onnxprune.profiling.profile_model` reports)::

    profile, batch_size, backend, precision, provider, provenance, latency_ms {p50, p90, p95, p99, mean, min, max, std},
    latency_p50_ms (Stat over seeds), throughput_per_s, peak_rss_bytes, gpu_memory_bytes,
    speedup_vs_dense (dense p50 / this p50), speedup_timing ("interleaved": both models timed in
    alternation D P D P ... in one measurement, mean over seeds; "separate": from the two profiles,
    where no interleaved timing exists; null for the dense model, 1.0 by definition), meets_latency_budget,
    versions, notes, nodes [{host, cpu, gpu}: the machines it was measured on, each once; gpu null without one],
    measured_on (where and how: host, cpu_model, cores, gpu, gpu_driver, onnxruntime, tensorrt, threads,
    co_tenancy exclusive | shared with co_tenancy_basis, fingerprint; over seeds the first one's, shared if
    any was, with hosts/fingerprints when they differ: see onnxprune.profiling.provenance),
    speedup_measured_on (the same for the interleaved speedup timing; null for "separate")

The standard deviation is the sample standard deviation over seeds (0 with one seed).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import OnnxPruneError

SCHEMA_VERSION = 1


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stat(_M):
    mean: float | None
    std: float | None
    n: int
    values: list[float | None]


class SplitAccuracy(_M):
    top1: Stat
    top5: Stat | None = None
    samples: int | None = None
    mean_rel_l2: Stat | None = None  # unlabeled data: fidelity to the dense model
    top1_agreement: Stat | None = None
    metric: dict[str, Stat] | None = None  # the recipe's evaluation.metric


class MeasuredOn(_M):
    """Where and how a figure was measured (:func:`onnxprune.profiling.provenance.measured_on`)."""

    model_config = ConfigDict(extra="allow")

    host: str | None
    cpu_model: str | None
    cores: dict[str, int | None]
    gpu: str | None = None
    gpu_driver: str | None = None
    onnxruntime: str | None = None
    tensorrt: str | None = None
    threads: dict[str, Any]
    co_tenancy: Literal["exclusive", "shared"]
    co_tenancy_basis: dict[str, Any]
    fingerprint: str


class Measurement(_M):
    model_config = ConfigDict(extra="allow")

    profile: str
    batch_size: int
    backend: str
    precision: str | None = None
    provider: str | None = None
    provenance: str
    latency_ms: dict[str, float]
    latency_p50_ms: Stat
    throughput_per_s: float | None = None
    peak_rss_bytes: float | None = None
    gpu_memory_bytes: float | None = None
    speedup_vs_dense: float | None = None
    speedup_timing: Literal["interleaved", "separate"] | None = None
    meets_latency_budget: bool | None = None
    versions: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    measured_on: "MeasuredOn | None" = None
    speedup_measured_on: "MeasuredOn | None" = None


class RunRecord(_M):
    model_config = ConfigDict(extra="allow")

    seed: int | None
    model: str
    accuracy: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    prune: dict[str, Any] | None = None
    train: dict[str, Any] | None = None


class Point(_M):
    id: str
    method: str
    kind: Literal["dense", "structured", "unstructured", "nm", "mixed"]
    settings: dict[str, Any]
    seeds: list[int | None]
    models: list[str]
    params: float
    nonzero_params: float
    sparsity: float
    compression_ratio: float | None
    macs: float | None
    nonzero_macs: float | None
    theoretical_speedup: float | None
    macs_reduction: float | None
    file_bytes: float
    gzip_bytes: float | None  # null where it says nothing (structured points; dense without such points)
    accuracy: dict[Literal["val", "test"], SplitAccuracy] = Field(default_factory=dict)
    profiles: dict[str, list[Measurement]] = Field(default_factory=dict)
    runs: list[RunRecord] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    quantized: "Point | None" = None  # the recipe's quantize: stage (a twin has none of its own)
    quantization: dict[str, Any] | None = None  # on a quantized twin: how it was made, and whether it is faster


class Report(_M):
    schema_version: Literal[1]
    tool: dict[str, str]
    created: str
    recipe: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any] | None
    retraining: dict[str, Any] | None
    hw_profiles: list[dict[str, Any]]
    dense: Point
    dense_finetuned: Point | None = None
    points: list[Point]
    pareto: dict[str, list[str]] = Field(default_factory=dict)
    sensitivity: dict[str, Any] | None = None
    guidance: list[str] = Field(default_factory=list)
    plots: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    versions: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, int] = Field(default_factory=dict)


def validate_report(data: Any, label: str = "report.json") -> Report:
    """Validate a report mapping; one-line :class:`OnnxPruneError` naming the first bad field."""
    if not isinstance(data, dict):
        raise OnnxPruneError(f"{label}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise OnnxPruneError(f"{label}: schema_version {version!r} is not supported (this onnxprune reads {SCHEMA_VERSION})")
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise OnnxPruneError(f"{label}: field '{loc}': {err['msg']}") from None


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation of the non-null values (std 0 for one value)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": [None if v is None else float(v) for v in values]}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": [None if v is None else float(v) for v in values]}


def pareto_front(points: Sequence[tuple[float | None, float | None]], *, reference: int | None = None,
                 rel_tol: float = 0.0) -> list[int]:
    """Indices of the points not dominated when minimizing ``x`` (latency) and maximizing ``y`` (accuracy).

    A point is dominated when another is at least as good on both axes and better on one. Points
    with a missing coordinate are never on the front. Ties (equal x and y) are all kept. Against
    ``reference`` (the dense control), a latency gain under ``rel_tol`` (relative) is timing noise,
    not a gain: the reference wins such ties and is beaten only by a point faster beyond the noise or
    more accurate. Returned in increasing ``x``.
    """
    valid = [(i, float(x), float(y)) for i, (x, y) in enumerate(points) if x is not None and y is not None]

    def dominates(j: int, xj: float, yj: float, i: int, xi: float, yi: float) -> bool:
        tol = rel_tol if reference in (i, j) else 0.0
        if j == reference:
            return xj <= xi * (1 + tol) and yj >= yi
        return xj <= xi and yj >= yi and (xj * (1 + tol) < xi or yj > yi)

    front = []
    for i, x, y in valid:
        if not any(dominates(j, x2, y2, i, x, y) for j, x2, y2 in valid if j != i):
            front.append((x, -y, i))
    return [i for _, _, i in sorted(front)]


def load_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The validated report.json of a run directory (one-line errors for a missing or bad one)."""
    d = Path(run_dir)
    path = d / "report.json"
    if not d.is_dir():
        raise OnnxPruneError(f"{d}: no such run directory")
    if not path.is_file():
        raise OnnxPruneError(f"{d}: no report.json (is this the -o directory of onnxprune run?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OnnxPruneError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    validate_report(data, str(path))
    return data
