"""The bridge against ONNX's own operator conformance cases (``onnx.backend.test.case.node``, shipped
in the onnx wheel): every case whose ops are all in the bridge's table must reproduce the expected
outputs within the case's tolerances (as ``onnx.backend.test.runner`` compares them), or the bridge
must refuse the case when the module is built. A wrong number is never acceptable.

``python -m onnxprune.bridge.conformance`` prints the counts and the refusals by reason (``-v``:
every case that fails, ``--refused``: every refused case).
"""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx

from ..core.errors import OnnxPruneError
import re
from onnx.backend.test.case.node import collect_testcases
from onnx import numpy_helper

#: outcomes of one case
PASS, REFUSED, UNCLAIMED, WRONG, ERROR = "pass", "refused", "unclaimed", "wrong", "error"


#: Every refusal the bridge makes on a claimed conformance case, and why (README "Bridge operator
#: coverage" lists them; the conformance test fails on a refusal that matches none).
REFUSALS: list[tuple[str, str]] = [
    (r"element type UINT(16|32|64)\b", "unsigned 16/32/64-bit integers: torch stores them but has no arithmetic for them"),
    (r"element type (FLOAT8\w*|FLOAT4E2M1|U?INT[24]|STRING)\b",
     "8/4/2-bit floats and integers, strings: no torch dtype computes with them"),
    (r"is not a tensor|sequence/optional", "sequence, map and optional values"),
    (r"Dropout .*training mode", "Dropout in training mode (a run-time or true training_mode input): random output"),
    (r"BatchNormalization .*training mode", "BatchNormalization with training_mode=1 (batch statistics outputs)"),
    (r"Resize .*tf_crop_and_resize' and scales",
     "Resize tf_crop_and_resize from scales: the spec and its reference size the output differently"),
]


def refusal_reason(message: str) -> str | None:
    """The documented reason a refusal message falls under (None: an undocumented refusal)."""

    return next((why for pattern, why in REFUSALS if re.search(pattern, message)), None)


@dataclass
class Outcome:
    name: str
    status: str
    detail: str = ""


def node_cases() -> list:
    """Every node test case of the installed onnx wheel (model and data built in memory)."""

    return [c for c in collect_testcases() if c.model is not None and c.data_sets]


def _ops(graph: onnx.GraphProto) -> Iterator[tuple[str, str]]:
    for node in graph.node:
        yield node.domain, node.op_type
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _ops(g)


def claimed(model: onnx.ModelProto) -> bool:
    """Whether every op of the model (subgraphs included) is in the bridge's table."""
    from .ops import TABLE  # lazy: imports torch

    return all(d in ("", "ai.onnx") and t in TABLE for d, t in _ops(model.graph))


def _compare(ref: np.ndarray, out: np.ndarray, rtol: float, atol: float) -> str:
    """'' when ``out`` matches ``ref`` as onnx.backend.test.runner requires, else why not."""
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype} != expected {ref.dtype}"
    if out.dtype.name == "bfloat16":  # as the runner: two bfloat16 ULPs, compared in float32
        rtol, out, ref = max(rtol, 2**-6), out.astype(np.float32), ref.astype(np.float32)
    try:
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)
    except AssertionError as exc:
        return " ".join(str(exc).split())[:300]
    return ""


def _array(x) -> np.ndarray | None:
    """A case's value as numpy (the data holds arrays, numpy scalars or TensorProtos); None for a
    sequence or optional."""
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    return None


def _to_numpy(t, like: np.dtype) -> np.ndarray:
    import torch  # lazy: torch ([train] extra)

    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits (ml_dtypes, as onnx does)
        bits = t.view(torch.int16).numpy()
        return bits.view(like) if like.name == "bfloat16" else t.float().numpy()
    return t.numpy()


def run_case(case) -> Outcome:
    """Build the bridge module of one conformance case, run every data set, compare."""
    import torch  # lazy: torch ([train] extra)

    from .module import OnnxModule, _to_tensor  # lazy: imports torch

    if not claimed(case.model):
        return Outcome(case.name, UNCLAIMED)
    try:
        module = OnnxModule(case.model)
    except OnnxPruneError as exc:
        return Outcome(case.name, REFUSED, str(exc))
    except Exception as exc:  # noqa: BLE001 - a bridge bug, reported as such
        return Outcome(case.name, ERROR, f"building: {type(exc).__name__}: {exc}")
    module.eval()
    for inputs, expected in case.data_sets:
        inputs, expected = [_array(x) for x in inputs], [_array(x) for x in expected]
        if any(x is None for x in inputs + expected):
            return Outcome(case.name, REFUSED, "sequence/optional values are not tensors")
        try:
            feeds = [_to_tensor(x) for x in inputs]
        except OnnxPruneError as exc:
            return Outcome(case.name, REFUSED, str(exc))
        try:
            with torch.no_grad():
                outs = module(*feeds)
        except Exception as exc:  # noqa: BLE001 - an outcome to report, not to raise
            return Outcome(case.name, ERROR, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        outs = outs if isinstance(outs, tuple) else (outs,)
        if len(outs) != len(expected):
            return Outcome(case.name, WRONG, f"{len(outs)} outputs, expected {len(expected)}")
        for i, (ref, out) in enumerate(zip(expected, outs)):
            why = _compare(ref, _to_numpy(out, ref.dtype), case.rtol, case.atol)
            if why:
                return Outcome(case.name, WRONG, f"output {i}: {why}")
    return Outcome(case.name, PASS)


def main(argv: list[str]) -> int:
    import torch  # lazy: torch ([train] extra)

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # the case generators' own overflow warnings
        warnings.simplefilter("ignore")
        cases = node_cases()
    t1 = time.perf_counter()
    outcomes = [run_case(c) for c in cases]
    t2 = time.perf_counter()
    counts = {s: sum(o.status == s for o in outcomes) for s in (PASS, REFUSED, WRONG, ERROR, UNCLAIMED)}
    claimed_n = len(outcomes) - counts[UNCLAIMED]
    if "-v" in argv:
        for o in outcomes:
            if o.status not in (PASS, UNCLAIMED) and (o.status != REFUSED or "-vv" in argv):
                print(f"{o.status:8s} {o.name}: {o.detail}")
    if "--refused" in argv:
        for o in outcomes:
            if o.status == REFUSED:
                print(f"refused {o.name}: {o.detail}")
    print(f"{len(outcomes)} cases, {claimed_n} claimed: " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f"  (collect {t1 - t0:.1f} s, run {t2 - t1:.1f} s)")
    reasons: dict[str, int] = {}
    for o in outcomes:
        if o.status == REFUSED:
            why = refusal_reason(o.detail) or f"UNDOCUMENTED: {o.detail}"
            reasons[why] = reasons.get(why, 0) + 1
    for why, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  refused {count:4d}: {why}")
    return 0 if counts[WRONG] == counts[ERROR] == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
