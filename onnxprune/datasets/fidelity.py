"""Fidelity: how closely a (pruned) model's outputs follow a reference (the dense model) on data.

Pure numpy measures per output (whole-array, not per element: relative errors of single elements
explode where outputs cross zero), plus :func:`run_onnx` to get outputs with ONNX Runtime and
:func:`evaluate_fidelity` for ``onnxprune eval --reference``. No labels needed: this is how a
detector, a segmenter or any multi-output head is scored against its dense original.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..core.errors import OnnxPruneError
from .evaluate import evaluate_onnx
from .output_kind import infer_output_kinds
from ..core.user_code import import_callable
from .core import load_dataset
from .inputs import bind_inputs, model_inputs
from ..core.runtime import fixed_batch, open_session, run_batched


def _pair(ref: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, out = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise OnnxPruneError(f"output shapes differ: reference {list(ref.shape)}, model {list(out.shape)}")
    return ref, out


def rel_l2(ref: np.ndarray, out: np.ndarray) -> float:
    """``||out - ref|| / ||ref||`` over the whole array (0 when both are zero, inf when only ref is)."""
    ref, out = _pair(ref, out)
    num, den = float(np.linalg.norm(out - ref)), float(np.linalg.norm(ref))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays (1 when both are zero, 0 when only one is)."""
    ref, out = _pair(ref, out)
    a, b = ref.ravel(), out.ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def max_abs_diff(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = _pair(ref, out)
    return float(np.max(np.abs(out - ref))) if ref.size else 0.0


def class_scores(a: np.ndarray) -> np.ndarray | None:
    """``a`` as N x classes scores when it is one (2-D float, >= 2 columns, after squeezing trailing
    1-sized dims), else None. Segmentation maps (N x C x H x W) are not class scores here."""
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating) or a.ndim < 2:
        return None
    if a.ndim > 2 and all(d == 1 for d in a.shape[2:]):
        a = a.reshape(a.shape[0], -1)
    return a if a.ndim == 2 and a.shape[1] >= 2 else None


def top1_agreement(ref: np.ndarray, out: np.ndarray) -> float | None:
    """Share of samples whose arg-max class is the same in both; None when not class scores."""
    r, o = class_scores(ref), class_scores(out)
    if r is None or o is None or r.shape != o.shape or len(r) == 0:
        return None
    return float(np.mean(np.argmax(r, axis=1) == np.argmax(o, axis=1)))


def why_no_top1_agreement(ref: np.ndarray, out: np.ndarray, scores: bool = True, kind: str | None = None) -> str | None:
    """Why :func:`output_fidelity` has no ``top1_agreement`` for this pair (None when it has one):
    a missing figure says why, so an absent number is never mistaken for one not asked for."""
    if kind == "embedding":
        return "an embedding: compared by mean_cosine and nn_agreement, never by top-1"
    if kind == "value":
        return "a value output, not class scores (declare --output-kind NAME=scores for a classifier's logits)"
    if not scores:
        return "not taken as class scores (no Softmax/LogSoftmax behind it, and the model has several outputs)"
    r, o = class_scores(ref), class_scores(out)
    if r is None or o is None:
        a = np.asarray(ref)
        return f"outputs are not class scores (shape {list(a.shape)}, {a.dtype}; need N x classes floats)"
    if len(r) == 0:
        return "no samples"
    return None


def mean_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Per-sample cosine along the last axis (one embedding per row), averaged."""
    ref, out = _pair(ref, out)
    a, b = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    cos = np.where((na > 0) & (nb > 0), dot / np.maximum(na * nb, 1e-300), (na == nb).astype(np.float64))
    return float(cos.mean()) if len(cos) else 1.0


def nn_agreement(ref: np.ndarray, out: np.ndarray, limit: int = 4096) -> float | None:
    """Share of samples whose nearest neighbour (by cosine, among the other samples, at most
    ``limit`` of them) is the same sample under both embeddings: whether retrieval still finds the
    same thing. None with fewer than 3 samples."""
    ref, out = _pair(ref, out)
    n = min(len(ref), limit)
    if n < 3:
        return None

    def nearest(e: np.ndarray) -> np.ndarray:
        e = e[:n].reshape(n, -1)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return float(np.mean(nearest(ref) == nearest(out)))


def output_fidelity(ref: np.ndarray, out: np.ndarray, scores: bool = True, kind: str | None = None) -> dict[str, Any]:
    """``rel_l2``, ``cosine``, ``max_abs_diff`` and, when ``scores`` and the arrays are N x classes,
    ``top1_agreement``. With ``kind`` (:mod:`~onnxprune.datasets.output_kind`) the figures follow it
    instead: ``top1_agreement`` (arg-max over axis 1) for scores/probs, ``mean_cosine`` and
    ``nn_agreement`` for an embedding (never a top-1), nothing more for a value."""
    res: dict[str, Any] = {"rel_l2": rel_l2(ref, out), "cosine": cosine(ref, out), "max_abs_diff": max_abs_diff(ref, out)}
    if kind is None:
        agree = top1_agreement(ref, out) if scores else None
        if agree is not None:
            res["top1_agreement"] = agree
        return res
    r, o = np.asarray(ref), np.asarray(out)
    if kind in ("scores", "probs"):
        agree = top1_agreement(r, o)  # None unless N x classes (trailing 1-dims squeezed): see why_no_top1_agreement
        if agree is not None:
            res["top1_agreement"] = agree
    elif kind == "embedding" and r.ndim >= 1 and r.size:
        res["mean_cosine"] = mean_cosine(r, o)
        nn = nn_agreement(r, o)
        if nn is not None:
            res["nn_agreement"] = nn
    return res


def compare_outputs(refs: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray],
                    class_outputs: "Sequence[str] | None" = None) -> dict[str, dict[str, float]]:
    """:func:`output_fidelity` per output name (both must have the same names). ``class_outputs``:
    the outputs that hold class scores (see :func:`class_score_outputs`); None: any N x C array."""
    if set(refs) != set(outs):
        raise OnnxPruneError(f"outputs differ: reference has {sorted(refs)}, model has {sorted(outs)}")
    return {k: output_fidelity(refs[k], outs[k], class_outputs is None or k in class_outputs) for k in refs}


_PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze", "Cast"}


def class_score_outputs(model: "onnx.ModelProto | str | os.PathLike") -> list[str]:
    """Graph outputs taken as class scores (KL distillation, ``top1_agreement``): those computed by
    a Softmax/LogSoftmax (through Identity/Flatten/Reshape/Squeeze/Cast), and the output of a
    single-output model (a classifier's logits). A 2-D output next to others is not assumed to be
    class scores: it is as often a box or a regression head, matched by value instead."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    producers = {o: n for n in model.graph.node for o in n.output}
    outs = [o.name for o in model.graph.output]

    def softmax_behind(name: str) -> bool:
        for _ in range(8):
            n = producers.get(name)
            if n is None:
                return False
            if n.op_type in ("Softmax", "LogSoftmax"):
                return True
            if n.op_type not in _PASS_THROUGH or not n.input:
                return False
            name = n.input[0]
        return False

    return outs if len(outs) == 1 else [o for o in outs if softmax_behind(o)]


# --------------------------------------------------------------------------- ONNX Runtime

def session(model: "str | os.PathLike | onnx.ModelProto"):
    """A CPU ONNX Runtime session (one error line for a missing or unloadable model)."""
    return open_session(model)


def run_onnx(model: "str | os.PathLike | onnx.ModelProto | Any", inputs: Mapping[str, np.ndarray],
             batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every graph output of ``model`` on ``inputs`` (bound arrays, N first), in batches; a model
    with a fixed batch size gets exactly that (the last batch padded). ``model`` may be a session."""
    sess = model if hasattr(model, "get_inputs") else session(model)
    return run_batched(sess, inputs, batch_size=batch_size, fixed=fixed_batch(sess))


def evaluate_fidelity(model: "str | os.PathLike | onnx.ModelProto", reference: "str | os.PathLike | onnx.ModelProto",
                      inputs: Mapping[str, np.ndarray], batch_size: int = 256, *, labeled: bool = False,
                      output_kinds: Mapping[str, str] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Both models on the same inputs; per graph output :func:`output_fidelity` of ``model``
    against ``reference``, by the output's kind (:func:`~onnxprune.datasets.output_kind.infer_output_kinds`
    on the reference: ``labeled`` data make the first output a classifier's scores; ``output_kinds``
    declares kinds by name). Returns ``{"outputs": {name: {...}}, "output_kinds": {name: kind}, "samples": N}``
    and the model's outputs (for a user metric) as a second value. ``"missing"`` (when any) names each
    output without ``top1_agreement`` and why (:func:`why_no_top1_agreement`)."""
    sm, sr = session(model), session(reference)
    mo, ro = [o.name for o in sm.get_outputs()], [o.name for o in sr.get_outputs()]
    if mo != ro:
        raise OnnxPruneError(f"the model's outputs {mo} are not the reference's {ro}: fidelity compares outputs by name")
    outs, refs = run_onnx(sm, inputs, batch_size), run_onnx(sr, inputs, batch_size)

    kinds = infer_output_kinds(reference if isinstance(reference, onnx.ModelProto) else str(reference),
                               labeled=labeled, declared=output_kinds)
    per, missing = {}, {}
    for k in mo:
        if outs[k].shape != refs[k].shape:
            raise OnnxPruneError(f"output {k!r} has shape {list(outs[k].shape)}, the reference's is {list(refs[k].shape)}")
        per[k] = output_fidelity(refs[k], outs[k], kind=kinds[k])
        if "top1_agreement" not in per[k]:
            missing[k] = why_no_top1_agreement(refs[k], outs[k], kind=kinds[k])
    res = {"outputs": per, "output_kinds": kinds, "samples": int(len(next(iter(inputs.values()))))}
    if missing:
        res["missing"] = missing
    return res, outs


def call_metric(spec: str, outputs: Mapping[str, np.ndarray], labels: np.ndarray | None) -> dict[str, float]:
    """``python:module:function`` (or ``module:function``) called as ``fn(outputs, labels)``:
    outputs by graph-output name, labels or None; must return a dict of named numbers."""

    text = spec[len("python:"):] if spec.startswith("python:") else spec
    modname, _, fname = text.rpartition(":")
    if not modname or not fname:
        raise OnnxPruneError(f"--metric {spec!r}: expected python:module:function")
    fn = import_callable(modname, fname, f"--metric {spec!r}", namespace="onnxprune_user_metric")
    try:
        res = fn(dict(outputs), labels)
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: one line
        raise OnnxPruneError(f"--metric {spec!r}: {fname}() raised {type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if not isinstance(res, Mapping) or not res:
        raise OnnxPruneError(f"--metric {spec!r}: {fname}() must return a non-empty dict of named numbers, "
                             f"got {type(res).__name__}")
    out = {}
    for k, v in res.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise OnnxPruneError(f"--metric {spec!r}: value {k!r} is {type(v).__name__}, not a number") from None
    return out


def evaluate_outputs(model: "str | os.PathLike | onnx.ModelProto", data: Any, split: str = "test",
                     batch_size: int = 256, *, reference: "str | os.PathLike | onnx.ModelProto | None" = None,
                     metric: str | None = None, seed: int = 0,
                     output_kinds: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``onnxprune eval`` with ``--reference`` and/or ``--metric``, labeled data or not.

    Returns ``{"split", "samples"}`` plus ``top1``/``top5`` (labeled data, one-input classifiers),
    ``fidelity`` (per graph output :func:`output_fidelity` against ``reference``) and
    ``mean_rel_l2``, and ``metric`` (the user's ``fn(outputs, labels or None)``). Fidelity figures
    follow each output's kind (``output_kinds``: declared ``{name: kind}``; the rest inferred).
    ``missing`` (when any) says why a figure is absent: ``{"top1": reason,
    "fidelity.OUTPUT.top1_agreement": reason}``.
    """

    data = load_dataset(data, seed=seed)
    part = data.split(split)
    inputs = model_inputs(model)
    source = f"data {data.spec!r}"
    if part.x is not None:
        x, y = bind_inputs(inputs, part.x, source), part.y
    else:  # user DataLoaders
        got = [(bind_inputs(inputs, bx, source), by) for bx, by in part.batches(batch_size)]
        x = {k: np.concatenate([g[0][k] for g in got]) for k in got[0][0]}
        y = np.concatenate([g[1] for g in got]) if got[0][1] is not None else None
    res: dict[str, Any] = {"split": split, "samples": int(len(next(iter(x.values()))))}
    missing: dict[str, str] = {}
    if not data.labeled or y is None:
        missing["top1"] = f"data {data.spec!r} has no labels"
    elif len(inputs) != 1:
        missing["top1"] = f"top-1 scores one-input classifiers; this model has {len(inputs)} inputs"
    else:
        try:
            acc = evaluate_onnx(model, data, split=split, batch_size=batch_size)
            res.update(top1=acc["top1"], top5=acc["top5"])
        except OnnxPruneError as exc:  # labels that are not classes of the first output: the user's metric scores them
            missing["top1"] = str(exc)
    outs = None
    if reference is not None:
        fid, outs = evaluate_fidelity(model, reference, x, batch_size, labeled=data.labeled, output_kinds=output_kinds)
        res.update(reference=str(reference) if not isinstance(reference, onnx.ModelProto) else "(model)",
                   fidelity=fid["outputs"], output_kinds=fid["output_kinds"], mean_rel_l2=mean_rel_l2(fid["outputs"]))
        missing.update({f"fidelity.{k}.top1_agreement": why for k, why in fid.get("missing", {}).items()})
    if missing:
        res["missing"] = missing
    if metric:
        if outs is None:
            outs = run_onnx(model, x, batch_size)
        res["metric"] = call_metric(metric, outs, y if data.labeled else None)
    return res


def mean_rel_l2(per_output: Mapping[str, Mapping[str, float]]) -> float:
    """One number for checkpoint selection and summaries: the mean ``rel_l2`` over outputs."""
    vals: Sequence[float] = [v["rel_l2"] for v in per_output.values()]
    return float(np.mean(vals)) if vals else 0.0
