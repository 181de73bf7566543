"""The recipe schema: what a run prunes, how it retrains, what it measures and where.

A recipe is YAML validated by these pydantic models (unknown keys are errors, so a typo never
silently falls back to a default). Shape of a recipe::

    name: demo
    stages:                      # the default method when ``sweep.methods`` is empty
      - {kind: structured, criterion: l1, scope: global, target: {macs: 0.5}}
    schedule: {kind: one-shot}   # one-shot | iterative (steps) | agp (steps)
    retrain: {epochs: 3, optimizer: sgd, lr: 0.01, lr_schedule: cosine, batch_size: 64}
    data: {spec: digits}
    evaluation: {splits: [val, test]}
    hw: [ci-cpu]
    sweep:
      points: [{compression: 2}, {compression: 4}]   # operating points (targets)
      methods:                                       # compared under the same retraining budget
        - {name: structured-l1, kind: structured, criterion: l1}
        - {name: global-magnitude, kind: unstructured, criterion: magnitude, scope: global}
      seeds: [0, 1]
    sensitivity: {enabled: true, ratios: [0.1, 0.3, 0.5]}
    executor: local              # or ray, or {kind: ray, address: HOST:6379, max_retries: 2}
    quantize: {enabled: true, format: auto}   # each final model's quantized twin, measured beside it

Targets (exactly one field per target):
- ``ratio``: fraction removed: channels per group (structured) or weights (unstructured).
- ``sparsity``: fraction of prunable weights that are zero (unstructured).
- ``macs`` / ``params``: fraction of the dense model's MACs / parameters that is *kept*
  (``macs: 0.5`` = half the MACs = "2x MACs").
- ``compression``: dense parameters / nonzero parameters (ShrinkBench's compression ratio);
  ``compression: 1`` is the unpruned model, retrained like every other point.
- ``latency``: ``{profile, budget_ms, percentile}``: prune until the model measured on ``profile``
  meets the budget (bisection over the ratio).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from ..structured.importance import IMPORTANCE
from ..sparsity.scores import CRITERIA
import re

Kind = Literal["structured", "unstructured", "nm"]

#: Default criterion of each kind when a stage names none.
DEFAULT_CRITERION: dict[str, str] = {"structured": "l1", "unstructured": "magnitude", "nm": "magnitude"}


def criteria_of(kind: str) -> tuple[str, ...]:
    """Criteria the pruning functions of ``kind`` accept."""
    if kind == "structured":
        return tuple(IMPORTANCE)
    if kind == "unstructured":
        return tuple(CRITERIA)
    return ("magnitude",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LatencyTarget(_Strict):
    """Prune until ``percentile`` latency on ``profile`` is at most ``budget_ms``."""

    profile: str
    budget_ms: float = Field(gt=0)
    percentile: Literal["p50", "p90", "p95", "p99", "mean"] = "p50"
    max_ratio: float = Field(0.9, gt=0, lt=1, description="largest ratio the search may try")
    tolerance: float = Field(0.02, gt=0, lt=0.5, description="bisection stops when the ratio interval is this narrow")


class Target(_Strict):
    """How much to prune; exactly one field set (see the module docstring)."""

    ratio: float | None = Field(None, ge=0, lt=1)
    sparsity: float | None = Field(None, ge=0, lt=1)
    macs: float | None = Field(None, gt=0, le=1)
    params: float | None = Field(None, gt=0, le=1)
    compression: float | None = Field(None, ge=1)
    latency: LatencyTarget | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Target":
        set_ = self.fields_set_names()
        if len(set_) != 1:
            raise ValueError("a target sets exactly one of ratio, sparsity, macs, params, compression, latency"
                             f" (got {', '.join(set_) or 'none'})")
        return self

    def fields_set_names(self) -> list[str]:
        return [k for k in ("ratio", "sparsity", "macs", "params", "compression", "latency") if getattr(self, k) is not None]

    @property
    def kind(self) -> str:
        return self.fields_set_names()[0]

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def label(self) -> str:
        """Short id-safe label: ``macs0.5``, ``c4``, ``lat2ms-ci-cpu``."""
        k, v = self.kind, self.value
        if k == "latency":
            return f"lat{v.budget_ms:g}ms-{v.profile}"
        if k == "compression":
            return f"c{v:g}"
        return f"{k}{v:g}"


class Stage(_Strict):
    """One pruning step: what kind, which criterion, which scope, how much."""

    kind: Kind
    criterion: str | None = Field(None, description="importance criterion; default per kind (l1 / magnitude)")
    scope: Literal["global", "layer", "local"] = Field(
        "global", description="one threshold over all layers (global), or the same ratio in every layer/group (layer; "
                              "'local' is a synonym)")
    target: Target | None = Field(None, description="leave unset to take the sweep point's target")
    n: int = Field(2, ge=1, description="N of N:M (kind nm)")
    m: int = Field(4, ge=2, description="M of N:M (kind nm)")
    min_threshold: float | None = Field(None, ge=0, description="global magnitude + minimum threshold: keep at least"
                                        " this fraction of every layer")
    per_layer: dict[str, float] | Literal["sensitivity"] | None = Field(
        None, description="explicit per-layer/group ratios, or 'sensitivity' to derive them from the sensitivity analysis")
    ignore: list[str] = Field(default_factory=list, description="node names never pruned")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the pruning function")
    hw: str | None = Field(None, description="hardware profile the stage prunes for: its channel_multiple is the default "
                                            "round_to of structured pruning (a latency target's profile counts too)")

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        known = criteria_of(kind) if kind else ()
        if v is not None and known and v not in known:
            raise ValueError(f"{v!r} is not a criterion of kind {kind} (expected one of: {', '.join(known)})")
        return v

    @model_validator(mode="after")
    def _check(self) -> "Stage":
        if self.scope == "local":
            object.__setattr__(self, "scope", "layer")
        if self.criterion is None:
            object.__setattr__(self, "criterion", DEFAULT_CRITERION[self.kind])
        if self.kind == "nm" and self.n >= self.m:
            raise ValueError(f"N:M needs n < m (got {self.n}:{self.m})")
        return self


class Schedule(_Strict):
    """When pruning happens relative to retraining."""

    kind: Literal["one-shot", "iterative", "agp"] = "one-shot"
    steps: int = Field(1, ge=1, description="pruning steps for iterative / agp (the retraining budget is split over them)")

    @model_validator(mode="after")
    def _check(self) -> "Schedule":
        if self.kind == "one-shot" and self.steps != 1:
            raise ValueError("a one-shot schedule has steps: 1 (use kind: iterative or agp for more)")
        return self


class Retrain(_Strict):
    """The one retraining budget every method of a run gets (the fairness principle).

    Field names and defaults follow :class:`onnxprune.training.config.TrainConfig` (the seed comes
    from the sweep); ``distillation`` turns on distillation from the dense input model and
    ``finetune_dense`` also fine-tunes the dense control with the same budget.
    """

    epochs: int = Field(0, ge=0, description="0 = no retraining")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(64, ge=1)
    train_bn: bool = False
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    distillation: bool = Field(False, description="distil from the dense input model")
    distill_alpha: float = Field(0.5, ge=0, le=1)
    distill_temperature: float = Field(4.0, gt=0)
    distill_features: bool = Field(False, description="with a teacher (distillation, or unlabeled data): also match "
                                                      "the residual stream of a transformer (else the pruned layers' outputs)")
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature loss next to the output loss")
    finetune_dense: bool = Field(False, description="also fine-tune the dense control with the same budget")

    def train_config_dict(self, seed: int) -> dict[str, Any]:
        """The keyword arguments of ``TrainConfig`` for one seed."""
        d = self.model_dump(exclude={"distillation", "finetune_dense"})
        d["seed"] = int(seed)
        return d


class Evaluation(_Strict):
    """Accuracy on the validation split (checkpoint/decision use) and the test split (reported once)."""

    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    batch_size: int = Field(256, ge=1)
    metric: str | None = Field(None, description="python:module:function(outputs, labels or None) -> "
                                                    "{name: number}, reported next to accuracy/fidelity")


class Profiling(_Strict):
    """Measurement settings that replace the hardware profiles' own (None = the profile's value)."""

    warmup_runs: int | None = Field(None, ge=0)
    min_runs: int | None = Field(None, ge=1)
    min_duration_s: float | None = Field(None, ge=0)
    batch_sizes: list[int] | None = Field(None, min_length=1)
    memory: bool = Field(True, description="measure peak memory (a separate process per model and batch size)")

    def apply(self, profile: Any) -> Any:
        """A copy of a HwProfile with these settings."""
        update = {k: v for k, v in self.model_dump(exclude={"memory"}).items() if v is not None}
        return profile.model_copy(update=update) if update else profile


class Method(_Strict):
    """A named pruning method: one or more stages under a schedule."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    stages: list[Stage] = Field(min_length=1)
    schedule: Schedule | None = Field(None, description="default: the recipe's schedule")
    points: list[Target] | None = Field(None, description="this method's own operating points (default: sweep.points)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """``{name, kind, criterion, ...}`` is a one-stage method."""
        if isinstance(data, dict) and "stages" not in data and "kind" in data:
            data = dict(data)
            head = {k: data.pop(k) for k in ("name", "schedule", "points") if k in data}
            return {**head, "stages": [data]}
        return data


class Sweep(_Strict):
    points: list[Target] = Field(default_factory=list, description="operating points; empty = the stages' own targets")
    methods: list[Method] = Field(default_factory=list, description="empty = one method from the recipe's stages")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[Method]) -> list[Method]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method names must be unique (repeated: {', '.join(dup)})")
        return v


class Sensitivity(_Strict):
    """Prune each group/layer alone at several ratios, without retraining, and measure."""

    enabled: bool = False
    kind: Literal["structured", "unstructured"] = "structured"
    criterion: str | None = None
    ratios: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7])
    latency: bool = Field(False, description="also measure latency per profile at every ratio")
    max_drop: float = Field(0.01, ge=0, le=1, description="accuracy drop allowed per layer when deriving per-layer ratios")
    max_layers: int | None = Field(None, ge=1, description="analyse only the largest N layers/groups (by MACs)")

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v or any(not (0 < r < 1) for r in v):
            raise ValueError("ratios are a non-empty list of numbers between 0 and 1 (exclusive)")
        return sorted(set(v))


class Executor(_Strict):
    """Where the operating points run: ``local`` (this process, one after another) or ``ray`` (one Ray
    task chain per point). ``executor: ray`` is short for ``executor: {kind: ray}``; ``--executor`` and
    ``--ray-address`` override it."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray cluster address (HOST:6379, ray://HOST:10001 or auto); "
                                                  "none = RAY_ADDRESS, else a Ray instance started on this machine")
    max_retries: int = Field(2, ge=0, description="Ray: retries of a task whose worker died or that raised an "
                                                  "unexpected error (input errors are reported, not retried)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data


class Recover(_Strict):
    """Recovering accuracy without training (``prune --calibrate``): after each structured stage the
    layers reading pruned channels are re-fitted toward the dense model on unlabeled inputs taken
    from the recipe's data (labels unused). Runs before any retraining, which then starts closer."""

    calibrate: bool = Field(False, description="calibrate structured stages on the data (numpy + ONNX Runtime)")
    samples: int = Field(256, ge=1, description="calibration samples taken from the data's training split")
    method: Literal["refit", "bn"] = Field("refit", description="refit: least squares; bn: relative BN/bias shift only")


class Quantize(_Strict):
    """A quantized twin of every final model (the dense control's too), through ONNX Runtime's
    quantizer (:func:`onnxprune.quantization.quantize_model`), calibrated on unlabeled inputs from the
    data's training split and then evaluated and timed like its float model. Whether to quantize is a
    measurement: the report sets each twin beside its float row. ``quantize: true`` is short for
    ``quantize: {enabled: true}``."""

    enabled: bool = Field(False, description="quantize every final model (the dense control's too) and report both")
    format: Literal["auto", "qdq", "qoperator", "fp16"] = Field(
        "auto", description="auto: by the run's first hardware profile's backend, as onnxprune quantize --hw does "
                            "(fp16 for CUDA profiles, QDQ for TensorRT and CPU)")
    per_channel: bool = Field(True, description="int8 weight scales per output channel")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="calibration of activation ranges")
    samples: int = Field(256, ge=1, description="calibration samples from the data's training split (labels unused)")
    check_samples: int = Field(64, ge=0, description="further training samples, not calibrated on, on which the "
                                                     "quantized outputs are compared with the float model's")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"enabled": data} if isinstance(data, bool) else data


class Recipe(_Strict):
    """A whole run: methods x operating points x seeds, retrained alike, measured alike."""

    name: str = "recipe"
    description: str = ""
    stages: list[Stage] = Field(default_factory=list)
    schedule: Schedule = Field(default_factory=Schedule)
    retrain: Retrain = Field(default_factory=Retrain)
    data: str | dict[str, Any] | None = Field(
        None, description="dataset spec for load_dataset ('digits', 'npz:PATH?val=0.1', or a mapping with 'spec'); "
                          "--data overrides")
    evaluation: Evaluation = Field(default_factory=Evaluation)
    hw: list[str] = Field(default_factory=list, description="hardware profile names to measure on")
    profiling: Profiling = Field(default_factory=Profiling)
    sweep: Sweep = Field(default_factory=Sweep)
    sensitivity: Sensitivity = Field(default_factory=Sensitivity)
    executor: Executor = Field(default_factory=Executor)
    recover: Recover = Field(default_factory=Recover)
    quantize: Quantize = Field(default_factory=Quantize)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if not self.stages and not self.sweep.methods and not self.sensitivity.enabled:
            raise ValueError("a recipe needs stages, sweep.methods or sensitivity.enabled: true")
        for method in self.methods():
            points = self.points_of(method)
            for i, st in enumerate(method.stages):
                if st.target is None and not points and st.kind != "nm" and st.per_layer is None:
                    raise ValueError(f"method {method.name!r} stage {i} has no target and there are no sweep points")
        return self

    def methods(self) -> list[Method]:
        """The methods compared: ``sweep.methods``, or one named after the recipe from ``stages``."""
        if self.sweep.methods:
            return list(self.sweep.methods)
        if self.stages:
            return [Method(name=_id_safe(self.name), stages=self.stages, schedule=None)]
        return []

    def schedule_of(self, method: Method) -> Schedule:
        return method.schedule or self.schedule

    def points_of(self, method: Method) -> list[Target]:
        return list(method.points if method.points is not None else self.sweep.points)


def _id_safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    return s or "method"
