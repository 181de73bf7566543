"""The pipeline's steps: each a small function calling one owner API (imported when the step runs).

``run.py`` strings them together and caches them; nothing here knows about the cache or the report.
Targets from a recipe are translated here into the arguments each pruning function takes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from ..core.errors import OnnxPruneError, UnavailableError
from ..recipes.schema import Stage, Target
import importlib
from ..metrics.inspection import inspect_model
from ..core.prepare import prepare
from ..core.model_io import save_model, load_graph
from ..profiling.hw_profile import profile_channel_multiple, with_remote
from dataclasses import replace
from ..calibration import StructuredCalibration, calibration_inputs
from .per_layer import prune_per_layer
from ..datasets.fidelity import evaluate_outputs
from ..profiling.runners import check_available

#: criteria that need loss gradients from the training data
GRADIENT_CRITERIA = ("taylor", "magnitude_x_gradient")


def _need(module: str, what: str, attr: str | None = None):
    """Import an owner module (and ``attr`` from it); a missing optional package says how to install
    it (exit 3). A missing onnxprune module or name is a bug and raises as one, never "not available"."""

    try:
        mod = importlib.import_module(module, __package__)
    except ImportError as exc:
        if exc.name in ("torch", "torch_pruning", "sklearn"):
            raise UnavailableError(f"{what} needs the Python package {exc.name!r}: pip install 'onnxprune[train]'") from None
        raise
    return getattr(mod, attr) if attr else mod


# ------------------------------------------------------------------------------------------ data / model

def load_data(spec: str | Mapping[str, Any]):
    """The dataset, split once with seed 0 so every method and seed sees the same val/test samples."""
    ds = _need("..datasets", "loading a dataset")
    if isinstance(spec, Mapping):
        spec = dict(spec)
        text = spec.pop("spec", None)
        if text is None:
            raise OnnxPruneError("data: a mapping needs a 'spec' key (e.g. {spec: digits})")
        return ds.load_dataset(text, seed=0, preprocess=spec or None)
    return ds.load_dataset(spec, seed=0)


def gzip_meaningful(stages: Sequence[Stage]) -> bool:
    """Whether a gzip size says something about these stages' models: zeros compress (unstructured,
    N:M), while structured pruning shrinks the file itself, so gzipping it is only wasted time."""
    return any(s.kind in ("unstructured", "nm") for s in stages)


def model_figures(path: str | os.PathLike, gzip: bool = True) -> dict[str, Any]:
    """Params, nonzero params, MACs, MACs of nonzero weights, file size, per-layer sparsity, and with
    ``gzip`` the gzip size (else ``gzip_bytes`` is None: see :func:`gzip_meaningful`)."""

    info = inspect_model(path)
    nonzero_macs: float | None = 0.0
    layers = []
    for n in info["nodes"]:
        if n["macs"] is None:
            nonzero_macs = None
        elif nonzero_macs is not None:
            nonzero_macs += n["macs"] * (1.0 - n.get("sparsity", 0.0))
        if "sparsity" in n:
            layers.append({"name": n["name"], "kept": 1.0 - n["sparsity"]})
    gz = _need("..sparsity.storage", "gzip size").gzip_file_bytes(path) if gzip else None
    return {"params": info["params"], "nonzero_params": info["nonzero_params"], "sparsity": info["sparsity"],
            "macs": info["macs"], "nonzero_macs": nonzero_macs, "file_bytes": info["file_bytes"],
            "gzip_bytes": gz, "layers": layers}


def analyze(path: str | os.PathLike) -> dict[str, Any]:
    """Channel groups of the model: how many can be pruned and why the others cannot."""
    channels = _need("..channels.analyze", "channel analysis")

    an = channels.analyze_channels(prepare(path).view)
    return {"groups": len(an.groups), "prunable_groups": len(an.prunable),
            "prunable_channels": sum(g.size for g in an.prunable),
            "unprunable": [{"id": g.id, "nodes": list(g.nodes)[:4], "reason": g.reason} for g in an.unprunable][:50]}


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    return save_model(model, path)


# ----------------------------------------------------------------------------------------------- pruning

def structured_kwargs(target: Target) -> dict[str, Any]:
    """A recipe target -> ``prune_structured`` target argument."""
    k, v = target.kind, target.value
    if k == "ratio":
        return {"ratio": v}
    if k == "macs":
        return {"target_macs": v}
    if k == "params":
        return {"target_params": v}
    if k == "compression":
        return {"target_params": 1.0 / v}
    if k == "sparsity":
        raise OnnxPruneError("target sparsity is for unstructured pruning; a structured stage takes ratio, macs, "
                             "params, compression or latency")
    raise OnnxPruneError(f"target {k} is not handled here")  # latency: see latency_target.py


def unstructured_sparsity(target: Target, source: str | os.PathLike | onnx.ModelProto, stage: Stage) -> float:
    """A recipe target -> the fraction of prunable weights to zero.

    ``compression`` c (and ``params`` f, read as c = 1/f) asks that dense params / nonzero params = c
    over *all* parameters; biases and normalization parameters are not prunable, so the prunable
    weights take more than 1 - 1/c (computed from a zero-sparsity probe of the model).
    """
    k, v = target.kind, target.value
    if k in ("sparsity", "ratio"):
        return float(v)
    if k in ("compression", "params"):
        c = v if k == "compression" else 1.0 / v
        sp = _need("..sparsity.prune", "unstructured pruning")
        probe = sp.prune_unstructured(source, sparsity=0.0, ignore=stage.ignore).summary
        prunable = probe["prunable_params"]
        prunable_nonzero = sum(l["nonzero"] for l in probe["layers"])
        other_nonzero = probe["nonzero_params"] - prunable_nonzero
        keep = probe["params"] / c - other_nonzero
        s = 1.0 - keep / prunable if prunable else 1.0
        if not 0.0 <= s < 1.0:
            raise OnnxPruneError(f"compression {c:g} is out of reach for unstructured pruning: only {prunable} of "
                                 f"{probe['params']} parameters are prunable weights")
        return max(0.0, s)
    if k == "macs":
        raise OnnxPruneError("unstructured pruning does not reduce the MACs dense kernels execute; use a sparsity or "
                             "compression target, or kind: structured for a MACs target")
    raise OnnxPruneError("a latency target needs kind: structured (zeros do not make dense kernels faster)")


def is_identity(stage: Stage) -> bool:
    """Stages whose target removes nothing (compression 1, ratio 0): the model passes unchanged."""
    t = stage.target
    return t is not None and ((t.kind == "compression" and t.value == 1) or (t.kind in ("ratio", "sparsity") and t.value == 0)
                              or (t.kind in ("macs", "params") and t.value == 1))


def stage_options(stage: Stage) -> dict[str, Any]:
    """The stage's ``options``; for structured stages that name a hardware profile (``hw:``, or a
    latency target's ``profile``), ``round_to`` defaults to the profile's ``channel_multiple``, counted in
    weight columns (whole heads), as ``prune --hw`` counts it."""
    kw = dict(stage.options)
    t = stage.target
    name = stage.hw or (t.latency.profile if t is not None and t.kind == "latency" else None)
    if stage.kind == "structured" and "round_to" not in kw and name:
        multiple, from_profile = profile_channel_multiple(name)
        if from_profile:
            kw.update(round_to=multiple, round_columns=True)
    return kw


def calibration_for(recover, data, stage: Stage, source: str | os.PathLike | onnx.ModelProto, seed: int = 0):
    """The ``recover: {calibrate: true}`` calibration of a structured stage on ``source`` (None
    otherwise): up to ``recover.samples`` unlabeled inputs from the data's training split."""
    if not recover.calibrate or stage.kind != "structured" or data is None:
        return None


    train = replace(data, val=None, test=None)  # calibration never sees the splits that are scored
    model = source if isinstance(source, onnx.ModelProto) else load_graph(source)
    return StructuredCalibration(calibration_inputs(train, model, recover.samples, seed=seed), method=recover.method,
                                 seed=seed, split="train")


def prune_stage(source: str | os.PathLike | onnx.ModelProto, stage: Stage, seed: int,
                gradients: Mapping[str, Any] | None = None, per_layer: Mapping[str, float] | None = None,
                calibration: Any = None):
    """One stage, one shot: returns the owner's :class:`~onnxprune.core.pruning_result.PruneResult`.
    ``calibration``: see :func:`calibration_for` (structured stages)."""
    kw = stage_options(stage)
    if stage.ignore:
        kw["ignore"] = list(stage.ignore)
    if stage.kind == "nm":
        sp = _need("..sparsity.prune", "N:M pruning")
        return sp.prune_nm(source, n=stage.n, m=stage.m, **kw)
    if gradients is not None:
        kw["gradients"] = gradients
    if per_layer is not None:
        return prune_per_layer(source, stage, per_layer, seed=seed, gradients=gradients)
    if stage.target is None:
        raise OnnxPruneError(f"stage {stage.kind} has no target")
    if stage.kind == "structured":
        st = _need("..structured.prune", "structured pruning")
        if calibration is not None:
            kw["calibration"] = calibration
        return st.prune_structured(source, criterion=stage.criterion, scope="local" if stage.scope == "layer" else "global",
                                   seed=seed, **structured_kwargs(stage.target), **kw)
    sp = _need("..sparsity.prune", "unstructured pruning")
    return sp.prune_unstructured(source, sparsity=unstructured_sparsity(stage.target, source, stage), scope=stage.scope,
                                 criterion=stage.criterion, min_threshold=stage.min_threshold or 0.0, seed=seed, **kw)


def gradients_for(source: str | os.PathLike | onnx.ModelProto, data, seed: int) -> dict[str, Any]:
    return _need("..training", "gradient-based criteria", "weight_gradients")(source, data, seed=seed)


def prune_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a prune summary worth keeping in the report (no long per-layer lists)."""
    keep = ("method", "criterion", "scope", "target", "target_sparsity", "achieved_sparsity", "min_threshold", "pattern",
            "params_before", "params_after", "macs_before", "macs_after", "macs_reduction", "channels_before",
            "channels_after", "compression_ratio", "sparsity_all_params", "prunable_params", "notes", "guidance", "skipped", "gradual",
            "latency_search", "per_layer")
    out = {k: summary[k] for k in keep if k in summary}
    if "groups" in summary:
        out["layers"] = [{"name": (g["nodes"] or [f"group {g['id']}"])[0], "kept": g["kept"] / g["total"] if g["total"] else 1.0}
                         for g in summary["groups"]]
    elif "layers" in summary:
        out["layers"] = [{"name": l["node"], "kept": 1.0 - l["sparsity"]} for l in summary["layers"]]
    cal = summary.get("calibration")
    if cal:  # recover.calibrate: the output error against the dense model before/after, and the cost
        out["calibration"] = {k: cal[k] for k in ("method", "samples", "split", "check", "outputs", "seconds") if k in cal}
    return out


# ------------------------------------------------------------------------------------ retraining / eval

def train_config(retrain_cfg: Mapping[str, Any]):
    return _need("..training", "retraining", "TrainConfig").from_dict(retrain_cfg)


def retrain(source: str | os.PathLike | onnx.ModelProto, data, config, teacher=None, progress: bool = False):
    """Fine-tune through the bridge (masks kept); the test split is NOT touched here."""
    finetune = _need("..training", "retraining", "finetune")
    return finetune(source, data, config, teacher=teacher, progress=progress, evaluate_test=False)


def prune_gradually(source, data, stage: Stage, schedule_kind: str, steps: int, config, teacher=None, seed: int = 0,
                    progress: bool = False):
    """Iterative / AGP prune -> retrain (structured or unstructured) up to the stage's target."""
    gradually = _need("..training", "gradual pruning", "prune_gradually")
    if stage.kind == "nm":
        raise OnnxPruneError("N:M pruning is one shot (the pattern is fixed); use schedule kind one-shot")
    t = stage.target
    kw: dict[str, Any] = {"criterion": stage.criterion, "ignore": list(stage.ignore), **stage_options(stage)}
    if stage.kind == "structured":
        kw.update(scope="local" if stage.scope == "layer" else "global", seed=seed)
        if t.kind == "macs":
            final, st_target = 1.0 - t.value, "macs"
        elif t.kind == "ratio":
            final, st_target = t.value, "ratio"
        else:
            raise OnnxPruneError(f"gradual structured pruning takes a ratio or macs target, not {t.kind}")
    else:
        kw.update(scope=stage.scope, min_threshold=stage.min_threshold or 0.0, seed=seed)
        final, st_target = unstructured_sparsity(t, source, stage), "ratio"
    return gradually(source, data, method=stage.kind, final=final, steps=steps,
                              schedule="agp" if schedule_kind == "agp" else "linear", structured_target=st_target,
                              prune_kwargs=kw, train_config=config, teacher=teacher, progress=progress)


def evaluate(path: str | os.PathLike, data, splits: Sequence[str], batch_size: int, *,
             reference: str | os.PathLike | None = None, metric: str | None = None) -> dict[str, Any]:
    """Top-1/top-5 per split, with ONNX Runtime on the written file. Unlabeled data: fidelity to
    ``reference`` (the dense model) instead (``mean_rel_l2``, ``top1_agreement``, per output);
    ``metric`` (``python:module:function``) adds the user's figures either way."""
    ds = _need("..datasets", "evaluation")
    if data.labeled and metric is None:
        return {s: ds.evaluate_onnx(path, data, s, batch_size) for s in splits}

    out = {}
    for s in splits:
        r = evaluate_outputs(path, data, s, batch_size, reference=None if data.labeled else (reference or path),
                             metric=metric)
        rec: dict[str, Any] = {"top1": r.get("top1"), "top5": r.get("top5"), "samples": r["samples"], "split": s}
        if "fidelity" in r:
            agree = [f["top1_agreement"] for f in r["fidelity"].values() if "top1_agreement" in f]
            rec.update(mean_rel_l2=r["mean_rel_l2"], top1_agreement=sum(agree) / len(agree) if agree else None,
                       fidelity=r["fidelity"])
        for key in ("metric", "missing"):  # missing: why a figure is absent (top1 without labels, ...)
            if key in r:
                rec[key] = r[key]
        out[s] = rec
    return out


# -------------------------------------------------------------------------------------------- profiling

def load_profiles(names: Sequence[str], remote: str | None = None, ssh_options: Sequence[str] = ()):
    """Load and check every profile before any work: a missing GPU fails here, in one line
    (with ``remote``, ``--remote``, they are measured on that device and checked there)."""
    prof = _need("..profiling", "hardware profiling")

    loaded = [with_remote(prof.load_hw_profile(n), remote, ssh_options) for n in names]
    for p in loaded:
        try:
            check_available(p)
        except OnnxPruneError as exc:
            raise type(exc)(f"{exc}; measure on another profile with --hw (e.g. --hw ci-cpu)") from None
    return loaded


def profile(path: str | os.PathLike, hw_profile, *, batch_sizes: Sequence[int] | None = None,
            memory: bool = True) -> dict[str, Any]:
    prof = _need("..profiling", "hardware profiling")
    return prof.profile_model(path, [hw_profile], batch_sizes=batch_sizes, memory=memory)


def speedup_vs(dense: str | os.PathLike, path: str | os.PathLike, hw_profile) -> dict[str, Any]:
    """Dense p50 / ``path`` p50 per batch size (keys are strings: JSON), timed interleaved (D P D P ...)
    so drift on a busy machine hits both models alike; separate profiles can differ by 10% on their own.
    ``measured_on`` says where and how the interleaved timing ran."""
    prof = _need("..profiling", "hardware profiling")
    res = prof.compare_models(dense, path, hw_profile)
    return {**{str(c["batch_size"]): c["ratios"]["speedup_p50"] for c in res["comparisons"]},
            "measured_on": res.get("measured_on")}
