"""The "never worse" guard shared by structured and unstructured calibration.

A fit that lowers every layer's own error can still move the whole model's outputs away from the
dense model's (a least-squares fit amplifies differences layer after layer on collinear inputs).
So every calibration result is judged as a whole: the graph outputs on check samples, before and
after, by one relative error (:func:`onnxprune.datasets.fidelity.rel_l2`, over the real tokens only
when an attention mask says which are padding); a result that moves them further away, or is not
finite, is not used.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..datasets.fidelity import rel_l2

#: per graph output: (relative error before, after)
Errors = dict[str, tuple[float, float]]


def rel_error(ref: np.ndarray, out: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Relative L2 of ``out`` to ``ref``; when the output is per token (``[batch, seq, ...]``) and
    ``mask`` is the model's ``[batch, seq]`` attention mask, over the real tokens only."""
    ref, out = np.asarray(ref), np.asarray(out)
    if mask is not None and ref.ndim >= 2 and ref.shape[:2] == np.shape(mask):
        keep = np.asarray(mask) != 0
        ref, out = ref[keep], out[keep]
    return rel_l2(ref, out)


def output_errors(reference: Mapping[str, np.ndarray], before: Mapping[str, np.ndarray],
                  after: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> Errors:
    """Every graph output's relative error to the dense model, before and after."""
    return {k: (rel_error(ref, before[k], mask), rel_error(ref, after[k], mask)) for k, ref in reference.items()}


def mean_error(errors: Errors, which: int) -> float:
    """The mean over outputs of the errors before (``which=0``) or after (1); 0 with no output."""
    return float(np.mean([e[which] for e in errors.values()])) if errors else 0.0


def is_worse(errors: Errors) -> bool:
    """True when the outputs moved further from the dense model's on average, or became NaN."""
    after = mean_error(errors, 1)
    return not after <= mean_error(errors, 0)


def rejection(method: str, errors: Errors, held_out: bool) -> dict[str, Any]:
    """The ``calibration.rejected`` entry of a result the guard did not use."""
    return {"method": method, "mean_rel_l2_after": mean_error(errors, 1),
            "reason": "the outputs moved further from the dense model's on the "
                      + ("held-out check samples" if held_out else "check samples")}
