"""Gradual pruning: prune a little, retrain, repeat (Zhu & Gupta 2017, "To prune, or not to prune").

The targets follow the AGP cubic schedule ``s_t = s_f + (s_i - s_f) (1 - t/n)^3`` for ``t = 1..n``
(large steps first, while there is much redundancy, small ones at the end), or a linear one. Every
step gets the same retraining budget (``train_config``); the full configuration is recorded in the
history of every step, so a gradual run can be compared fairly with a one-shot one given
``steps x epochs`` epochs.

Targets are fractions *removed*, always relative to the **original** model:

* unstructured: the fraction of prunable weights that are zero. Magnitude pruning an already
  pruned model ranks its zeros lowest, so earlier zeros stay zero and each step adds to them.
* structured, ``structured_target="ratio"``: the fraction of channels removed from each group of
  the original model. ``prune_structured`` counts its ``ratio`` on the channels the model has *now*,
  so step ``t`` asks for ``1 - (1 - s_t) / k`` where ``k`` is the fraction of the original channels
  left after the previous steps (``1 - s_{t-1}`` up to per-group rounding, measured from the channel
  counts so rounding does not accumulate): after it, ``(1 - s_t)`` of the original channels are left,
  not ``(1 - s_1)(1 - s_2)...`` of them.
* structured, ``structured_target="macs"``: the fraction of the original MACs removed; step ``t``
  asks ``prune_structured`` to keep ``(1 - s_t) * MACs_original / MACs_now`` of the current MACs.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import onnx

from ..datasets import DatasetSplits, evaluate_onnx, load_dataset
from ..core.errors import OnnxPruneError
from .config import TrainConfig
from ..metrics.macs import total_macs
from ..core.prepare import prepare
from .retrain import _as_model, finetune
from .gradients import weight_gradients
from ..sparsity.prune import prune_unstructured
from ..structured.prune import prune_structured

METHODS = ("structured", "unstructured")
SCHEDULES = ("agp", "linear")


def agp_schedule(initial: float, final: float, steps: int) -> list[float]:
    """Zhu & Gupta's cubic targets for steps ``1..steps``: ``s_f + (s_i - s_f)(1 - t/n)^3`` (last = final)."""
    _check_schedule(initial, final, steps)
    return [final + (initial - final) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]


def linear_schedule(initial: float, final: float, steps: int) -> list[float]:
    """Evenly spaced targets for steps ``1..steps`` (last = final)."""
    _check_schedule(initial, final, steps)
    return [initial + (final - initial) * t / steps for t in range(1, steps + 1)]


def _check_schedule(initial: float, final: float, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise OnnxPruneError(f"gradual pruning needs steps >= 1, got {steps!r}")
    if not (0.0 <= initial < 1.0 and 0.0 < final < 1.0):
        raise OnnxPruneError(f"sparsity targets must be fractions in [0, 1), got initial={initial!r} final={final!r}")
    if final < initial:
        raise OnnxPruneError(f"final sparsity {final:g} is below the initial {initial:g}")


def _macs(model: onnx.ModelProto) -> int | None:
    return total_macs(prepare(model).view)


def prune_gradually(model: "str | os.PathLike | onnx.ModelProto", data: "str | Mapping | DatasetSplits", *,
                    method: str = "unstructured", final: float, initial: float = 0.0, steps: int = 4,
                    schedule: str = "agp", structured_target: str = "ratio",
                    prune_kwargs: Mapping[str, Any] | None = None, train_config: TrainConfig | None = None,
                    teacher: "str | os.PathLike | onnx.ModelProto | None" = None,
                    progress: bool = True) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Iterate prune -> retrain ``steps`` times up to ``final``; return the model and the history.

    ``prune_kwargs`` go to ``prune_structured`` / ``prune_unstructured`` (criterion, scope, ...).
    A ``criterion`` needing gradients (``taylor``, ``magnitude_x_gradient``) gets fresh ones from
    the training data at every step. ``teacher``: distil from it during every retraining step.
    The test split is evaluated once, at the end.
    """

    if method not in METHODS:
        raise OnnxPruneError(f"gradual pruning method must be one of {', '.join(METHODS)}, got {method!r}")
    if schedule not in SCHEDULES:
        raise OnnxPruneError(f"gradual schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if structured_target not in ("ratio", "macs"):
        raise OnnxPruneError(f"structured_target must be ratio or macs, got {structured_target!r}")
    targets = (agp_schedule if schedule == "agp" else linear_schedule)(initial, final, steps)
    cfg = train_config or TrainConfig()
    kwargs = dict(prune_kwargs or {})
    for k in ("ratio", "target_macs", "target_params", "sparsity"):
        if k in kwargs:
            raise OnnxPruneError(f"prune_kwargs must not set {k!r}: the schedule sets the target of every step")
    t0 = time.perf_counter()
    ds = load_dataset(data)  # split seed 0, whatever the training seed
    current = _as_model(model)
    teacher_model = _as_model(teacher) if teacher is not None else None
    macs0 = _macs(current) if method == "structured" and structured_target == "macs" else None
    if macs0 is not None and not macs0:
        raise OnnxPruneError("structured_target='macs' needs the model's MACs, which are unknown")
    history: dict[str, Any] = {"method": method, "schedule": schedule, "initial": initial, "final": final,
                               "steps": steps, "targets": targets, "structured_target": structured_target,
                               "prune_kwargs": kwargs, "config": cfg.to_dict(), "data": ds.describe(),
                               "teacher": None if teacher is None else
                               ("teacher" if isinstance(teacher, onnx.ModelProto) else str(teacher)),
                               "per_step": []}
    prev = initial
    channels0 = channels_now = None  # prunable channels of the original model / of the current one
    needs_grad = kwargs.get("criterion") in ("taylor", "magnitude_x_gradient")
    for step, target in enumerate(targets, start=1):
        kw = dict(kwargs)
        if needs_grad:
            kw["gradients"] = weight_gradients(current, ds, seed=cfg.seed + step)
        if method == "unstructured":
            res = prune_unstructured(current, sparsity=target, **kw)
            asked = {"sparsity": target}
        else:
            if structured_target == "ratio":
                # kept now / original, from the channel counts actually left (per-group rounding drifts)
                kept_now = (channels_now / channels0) if channels0 else (1.0 - prev)
                step_ratio = min(max(1.0 - (1.0 - target) / kept_now, 0.0), 0.99)
                asked = {"ratio": step_ratio}
                res = prune_structured(current, ratio=step_ratio, **kw)
                channels0 = channels0 or res.summary.get("channels_before")
                channels_now = res.summary.get("channels_after") or channels_now
            else:
                keep = min(1.0, (1.0 - target) * macs0 / max(_macs(current) or macs0, 1))
                asked = {"target_macs": keep}
                res = prune_structured(current, target_macs=keep, **kw)
        pruned = res.model
        after_prune = evaluate_onnx(pruned, ds, "val", cfg.eval_batch_size)
        current, hist = finetune(pruned, ds, cfg, teacher=teacher_model, progress=progress, evaluate_test=False)
        entry = {"step": step, "target": target, "asked": asked, "prune_summary": _small(res.summary),
                 "val_top1_after_prune": after_prune["top1"], "val_top1_after_retrain": hist["best_val_top1"],
                 "best_epoch": hist["best_epoch"], "retrain": hist}
        if macs0:
            entry["macs_fraction_of_original"] = (_macs(current) or 0) / macs0
        if channels0 and channels_now:
            entry["channels_fraction_of_original"] = channels_now / channels0
        history["per_step"].append(entry)
        prev = target
    history["test"] = evaluate_onnx(current, ds, "test", cfg.eval_batch_size) if len(ds.test) else None
    history["seconds"] = round(time.perf_counter() - t0, 3)
    return current, history


def _small(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The prune summary without its per-layer lists (kept short in the history)."""
    return {k: v for k, v in summary.items() if not isinstance(v, list) or len(v) <= 8}
