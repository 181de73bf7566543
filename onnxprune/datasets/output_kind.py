"""What each graph output is: class ``scores``, ``probs`` (probabilities), an ``embedding`` or a ``value``.

The kind decides how an output is distilled and scored against the dense model (numpy + onnx only):

====================  =======================================  ======================================
kind                  distillation loss                        fidelity figures (besides rel_l2)
====================  =======================================  ======================================
``scores``            KL at temperature (softmax over axis 1)  ``top1_agreement``
``probs``             KL at temperature on their log           ``top1_agreement``
``embedding``         ``1 - cosine`` along the last axis       ``mean_cosine``, ``nn_agreement``
``value``             smooth-L1, each channel divided by the   (rel_l2, cosine, max_abs_diff only)
                      teacher's std of that channel
====================  =======================================  ======================================

Inferred from the graph where it says so (:func:`infer_output_kinds`): a Softmax right before the
output -> ``probs`` (LogSoftmax -> ``scores``); an L2 normalisation (``LpNormalization`` p=2, or a
``Div`` by a ``ReduceL2`` / ``Sqrt(ReduceSum(x*x))`` norm) -> ``embedding``; otherwise only a declared
classifier (labels given: the first output, which labels train) is ``scores``, and everything else
is a ``value``. A 2-D output is not assumed to be class scores: an embedding or a box head has that
shape too, and KL at temperature on values within +-0.2 is ~0 whatever the student does.
``--output-kind NAME=KIND`` overrides.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import onnx

from ..core.errors import OnnxPruneError

KINDS = ("scores", "probs", "embedding", "value")
#: ops that keep what an output is (walked through backwards from the output)
_PASS_THROUGH = {"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Transpose"}
#: ops between a norm and the Div that uses it (eps guards, broadcasting)
_NORM_GUARDS = {"Clip", "Max", "Add", "Expand", "Unsqueeze", "Reshape", "Cast", "Identity", "Squeeze"}


def parse_output_kinds(items: "Iterable[str] | Mapping[str, str] | None") -> dict[str, str]:
    """``["emb=embedding", ...]`` (the repeatable ``--output-kind``) or a mapping -> ``{name: kind}``."""
    if not items:
        return {}
    pairs = list(items.items()) if isinstance(items, Mapping) else []
    if not isinstance(items, Mapping):
        for item in items:
            name, sep, kind = str(item).rpartition("=")
            if not sep or not name:
                raise OnnxPruneError(f"--output-kind {item!r}: expected NAME=KIND, KIND one of {', '.join(KINDS)}")
            pairs.append((name, kind))
    out = {}
    for name, kind in pairs:
        if kind not in KINDS:
            raise OnnxPruneError(f"--output-kind {name}={kind}: the kind must be one of {', '.join(KINDS)}")
        out[str(name)] = kind
    return out


def _producer_walk(producers: Mapping[str, onnx.NodeProto], name: str, through: set[str], limit: int = 12):
    """The first node behind ``name`` that is not in ``through`` (following input 0), or None."""
    for _ in range(limit):
        n = producers.get(name)
        if n is None or n.op_type not in through or not n.input:
            return n
        name = n.input[0]
    return None


def _is_l2_norm(producers: Mapping[str, onnx.NodeProto], name: str) -> bool:
    """``name`` is computed as an L2 norm over an axis (ReduceL2, or Sqrt of a sum of squares)."""
    n = _producer_walk(producers, name, _NORM_GUARDS)
    if n is None:
        return False
    if n.op_type == "ReduceL2":
        return True
    if n.op_type == "Sqrt" and n.input:
        s = _producer_walk(producers, n.input[0], _NORM_GUARDS)
        if s is None:
            return False
        if s.op_type == "ReduceSumSquare":
            return True
        if s.op_type == "ReduceSum" and s.input:
            sq = producers.get(s.input[0])
            return sq is not None and sq.op_type in ("Mul", "Pow") and (
                sq.op_type == "Pow" or (len(sq.input) == 2 and sq.input[0] == sq.input[1]))
    return False


def graph_kind(model: onnx.ModelProto, output: str) -> str | None:
    """The kind the graph itself says ``output`` is (``probs``, ``scores``, ``embedding``), or None."""
    producers = {o: n for n in model.graph.node for o in n.output}
    n = _producer_walk(producers, output, _PASS_THROUGH)
    if n is None:
        return None
    if n.op_type == "Softmax":
        return "probs"
    if n.op_type == "LogSoftmax":
        return "scores"
    if n.op_type == "LpNormalization":
        p = next((a.i for a in n.attribute if a.name == "p"), 2)
        return "embedding" if p == 2 else None
    if n.op_type == "Div" and len(n.input) == 2 and _is_l2_norm(producers, n.input[1]):
        return "embedding"
    if n.op_type == "Mul" and len(n.input) == 2:  # x * (1 / ||x||)
        for a in n.input:
            r = producers.get(a)
            if r is not None and r.op_type == "Reciprocal" and _is_l2_norm(producers, r.input[0]):
                return "embedding"
    return None


def infer_output_kinds(model: "onnx.ModelProto | str | os.PathLike", *, labeled: bool = False,
                       declared: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{output name: kind}`` for every graph output, in graph order.

    ``declared`` (``--output-kind``) wins; then what the graph says (:func:`graph_kind`); then, with
    labels (``labeled``), the first output is the classifier's ``scores``; anything else is a ``value``.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    names = [o.name for o in model.graph.output]
    declared = dict(declared or {})
    unknown = sorted(set(declared) - set(names))
    if unknown:
        raise OnnxPruneError(f"--output-kind names {', '.join(unknown)}, which the model does not output "
                             f"(its outputs: {', '.join(names)})")
    out = {}
    for i, name in enumerate(names):
        kind = declared.get(name) or graph_kind(model, name)
        if kind is None:
            kind = "scores" if labeled and i == 0 else "value"
        out[name] = kind
    return out


def kinds_note(kinds: Mapping[str, str], declared: Mapping[str, str] | None, shapes: Mapping[str, tuple] | None = None
               ) -> list[str]:
    """Lines saying which 2-D outputs were taken as values for want of a declaration (a classifier's
    logits distilled without labels are matched by value unless declared ``scores``)."""
    declared = declared or {}
    notes = []
    for name, kind in kinds.items():
        shp = (shapes or {}).get(name)
        if kind == "value" and name not in declared and (shp is None or len(shp) == 2):
            notes.append(f"output {name!r} is matched as a value (no Softmax or L2 normalisation before it, no labels); "
                         f"if it holds class scores, pass --output-kind {name}=scores")
    return notes
