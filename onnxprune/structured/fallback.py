"""A failed rewrite never fails the command: the channel groups whose rewrite breaks the model are
found by bisection, left whole with the validator's message as the reason, and the rest is pruned.

A rule that maps channels wrongly through some op (an exporter's pattern no rule foresaw) shows up
as a pruned graph that fails validation: strict shape inference, the ONNX checker, or an ONNX
Runtime load. Which group is at fault is not in the message, so groups are re-tried in halves
(``log2(n)`` rewrites per bad group), then one by one if only a combination fails.
"""
from __future__ import annotations

from typing import Callable, Sequence

import onnx

from ..channels.types import KeepPlan
from ..core.errors import OnnxPruneError
from ..core.runtime import load_error

#: builds and validates the pruned model of a plan, raising on failure
Build = Callable[[KeepPlan], onnx.ModelProto]


#: Larger models skip the ONNX Runtime load: it serializes the whole model once more (memory and
#: seconds); strict shape inference and the checker still validate them.
ORT_CHECK_MAX_BYTES = 512 << 20


def ort_load_error(model: onnx.ModelProto) -> str | None:
    """Why ONNX Runtime cannot load ``model`` (one line), or None when it loads (or it is larger
    than :data:`ORT_CHECK_MAX_BYTES`)."""
    why = load_error(model, max_bytes=ORT_CHECK_MAX_BYTES)
    return None if why is None else f"ONNX Runtime cannot load it: {why[:240]}"


def _error(build: Build, plan: KeepPlan) -> tuple[onnx.ModelProto | None, str | None]:
    try:
        return build(plan), None
    except OnnxPruneError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a rewrite that crashes is a failed rewrite too
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def prune_dropping_broken(build: Build, plan: KeepPlan, cut: Sequence[int]) -> tuple[onnx.ModelProto, dict[int, str]]:
    """``(model, dropped)``: the model of ``plan`` without the groups whose rewrite fails
    validation, and those groups' ids with the validator's message. ``cut``: the groups ``plan``
    removes channels from (the others keep everything anyway)."""
    model, why = _error(build, plan)
    if why is None:
        return model, {}
    only = lambda gids: {g: plan[g] for g in gids}  # noqa: E731 - groups absent from a plan keep all
    base, base_why = _error(build, {})
    if base_why is not None:  # the unpruned model fails too: no group is to blame
        raise OnnxPruneError(f"the model fails validation before any channel is removed: {base_why}")
    bad: dict[int, str] = {}

    def bisect(gids: list[int], reason: str) -> None:
        if len(gids) == 1:
            bad[gids[0]] = reason
            return
        halves = (gids[: len(gids) // 2], gids[len(gids) // 2:])
        found = False
        for half in halves:
            _, w = _error(build, only(half))
            if w is not None:
                bisect(half, w)
                found = True
        if not found:  # only the two halves together fail: add the second half's groups one by one
            kept = list(halves[0])
            for g in halves[1]:
                _, w = _error(build, only(kept + [g]))
                if w is None:
                    kept.append(g)
                else:
                    bad[g] = w

    bisect(list(cut), why)
    while True:  # the rest together (combinations the bisection did not try)
        rest = [g for g in cut if g not in bad]
        model, why = _error(build, only(rest))
        if why is None:
            return model, bad
        kept: list[int] = []
        for g in rest:
            _, w = _error(build, only(kept + [g]))
            if w is None:
                kept.append(g)
            else:
                bad[g] = w
