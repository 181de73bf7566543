"""Sequential re-fit: each layer fitted on the inputs the *already calibrated pruned* model gives it,
toward the dense model's outputs of that layer (ThiNet, SparseGPT), in depth order.

The one-pass fit (:mod:`.structured`) fits every layer on the dense model's inputs, assuming that
everything upstream is already exact; on deep nets the upstream errors it ignores compound (the
output error of a one-pass-calibrated ResNet-50 reaches 1e6). Here the layers are grouped into
*stages* by topological depth (a layer's depth is the number of re-fitted layers on the longest path
into it, so layers of one depth never feed each other). The dense model runs once, keeping for every
layer its output rows at the sampled positions (:func:`dense_rows`); then each stage costs one ONNX
Runtime pass of the calibrated model's prefix, whose input rows at the same positions are paired
with them: memory stays one batch of activations, the sampled rows and ``O(d^2)`` per layer. When depths are
grouped (``stages`` below the depth count), a layer whose stage also holds layers upstream of it sees
them with their one-pass fit, which the stage then replaces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..core.graph import GraphView
from ..core.progress import ProgressBar
from ..core.runtime import fixed_batch, run_batches
from .collect import PENDING_BYTES, _batch_size, prefix, session
from .edit import ModelEditor, write_layer
from .fit import ridge_refit, rel_error
from .layers import Layer
from .stats import RowStats

#: default number of stages: None, one per depth (exact). A number groups consecutive depths into that
#: many passes (cheaper; a layer then sees same-stage layers upstream with their one-pass fit, which
#: measurably hurts: on a 31-conv ResNet, 8 stages gave 0.49 output error, 4 stages a rejected fit)
STAGES: int | None = None


def depths(view: GraphView, layers: Sequence[Layer]) -> dict[str, int]:
    """Per layer node, how many of ``layers`` lie on the longest path from the graph inputs to it."""
    mine = {l.node for l in layers}
    level: dict[str, int] = {}
    out: dict[str, int] = {}
    for node in view.nodes:  # topological order
        d = max((level.get(i, 0) for i in node.input if i), default=0)
        if node.name in mine:
            out[node.name] = d
            d += 1
        for o in node.output:
            level[o] = d
    return out


def stages(view: GraphView, layers: Sequence[Layer], most: int | None = STAGES) -> list[list[Layer]]:
    """``layers`` grouped by depth into at most ``most`` stages of consecutive depths (None: one per depth)."""
    dep = depths(view, layers)
    layers = [l for l in layers if l.node in dep]
    if not layers:
        return []
    count = max(dep.values()) + 1
    k = count if most is None else max(1, min(most, count))
    groups: list[list[Layer]] = [[] for _ in range(k)]
    for l in layers:
        groups[dep[l.node] * k // count].append(l)
    return [g for g in groups if g]


@dataclass
class Target:
    """What one layer's sequential fit needs: kept input channels/columns, kept outputs, the dense map."""

    layer: Layer
    cols: np.ndarray  # dense matrix columns of the kept input channels
    outs: np.ndarray  # kept output channels
    m: np.ndarray  # dense M [out, d] (float64)
    b: np.ndarray  # dense bias [out]
    shape: tuple[int, ...]  # pruned weight shape
    dtype: Any

    @property
    def a0(self) -> np.ndarray:
        """The dense layer restricted to the kept columns/outputs (what pruning alone leaves)."""
        return np.vstack([self.m[np.ix_(self.outs, self.cols)].T, self.b[self.outs][None, :]])


#: ridge strengths tried per layer when held-out rows can choose (relative to each column's spread):
#: a layer with fewer sampled rows than input columns (deep, small feature maps, few samples) needs far
#: more than the default, or its fit memorizes the rows and amplifies everything else
RIDGES = (1e-3, 1e-2, 1e-1, 1.0)


def refit(dense: onnx.ModelProto, start: onnx.ModelProto, groups: Sequence[Sequence[Layer]],
          targets: Mapping[str, Target], inputs: Mapping[str, np.ndarray], *, rows: int, ridge: float, seed: int = 0,
          mask: str | None = None, progress: bool = False, check: Mapping[str, np.ndarray] | None = None
          ) -> tuple[onnx.ModelProto, list[dict[str, Any]], list[dict[str, Any]]]:
    """``start`` (the pruned model, its layers possibly one-pass calibrated) with every layer of
    ``groups`` re-fitted stage by stage on its own activations: (model, entries, layers not re-fitted).
    ``check``: samples no fit sees; each layer's rows on them choose its ridge among ``ridge`` and
    :data:`RIDGES`, or keep the layer as pruning left it when no fit beats that on them."""
    out = onnx.ModelProto()
    out.CopyFrom(start)
    entries, failed = [], []
    n = len(next(iter(inputs.values())))
    per_sample = max(1, math.ceil(rows / max(n, 1)))
    layers = [l for g in groups for l in g if l.node in targets]
    bs, wanted = dense_rows(dense, layers, targets, inputs, per_sample, seed, mask, progress)
    held = dense_rows(dense, layers, targets, check, per_sample, seed + 1, mask, False) if check else None
    ridges = tuple(dict.fromkeys((ridge,) + RIDGES)) if check else (ridge,)
    for k, group in enumerate(groups):
        group = [l for l in group if l.node in targets]
        if not group:
            continue
        stats, bad = _stage_stats(out, group, targets, wanted, inputs, bs,
                                  progress and f"calibration: stage {k + 1}/{len(groups)}")
        val = _stage_stats(out, group, targets, held[1], check, held[0], False)[0] if held else {}
        failed += bad
        ed = ModelEditor(out)
        for l in group:
            wanted.pop(l.node, None)  # (free the dense rows as soon as the layer is fitted)
            if l.node not in stats:
                continue
            t, st = targets[l.node], stats[l.node]
            cols, outs = np.arange(st.d), np.arange(st.out)
            fits = []
            for r in ridges:
                info: dict[str, float] = {}
                a, err = ridge_refit(st, cols, outs, r, prior=t.a0[:-1], info=info)  # shrink toward dense
                fits.append((r, a, err, info))
            entry = {"node": l.node, "op_type": l.op_type, "method": "refit", "stage": k + 1,
                     "error_before": rel_error(st, cols, outs, t.a0), "rows": int(st.n)}
            vs = val.get(l.node)
            if vs is not None:  # choose on the held-out rows; pruning's own weights are a candidate too
                scored = [(rel_error(vs, cols, outs, a), r, a, err, info) for r, a, err, info in fits]
                best = min(scored, key=lambda c: c[0])
                base = rel_error(vs, cols, outs, t.a0)
                entry.update(check_rows=int(vs.n), check_error_before=base)
                if not best[0] < base:
                    write_layer(ed, l, ed.nodes[l.node], t.a0, t.shape, t.dtype)
                    entry.update(method="none", error_after=entry["error_before"], check_error_after=base,
                                 note="no re-fit beat the pruned layer on the held-out rows")
                    entries.append(entry)
                    continue
                _, r, a, err, info = best
                entry["check_error_after"] = best[0]
            else:
                r, a, err, info = fits[0]
            write_layer(ed, l, ed.nodes[l.node], a, t.shape, t.dtype)
            entry.update(error_after=err, ridge=r, condition=info.get("condition"), jitter=info.get("jitter"))
            entries.append(entry)
    return out, entries, failed


#: per layer, per batch: (sample index, output position, the dense layer's output rows there)
DenseRows = dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def dense_rows(dense: onnx.ModelProto, layers: Sequence[Layer], targets: Mapping[str, Target],
               inputs: Mapping[str, np.ndarray], per_sample: int, seed: int, mask: str | None,
               progress: bool) -> tuple[int, DenseRows]:
    """One pass of the dense model: per layer and batch, the sampled positions (real tokens only
    under ``mask``) and the dense layer's kept outputs there, which every stage's fit targets. Rows,
    not activations, are kept (``rows x outputs`` per layer), so the dense model runs once, not per
    stage. Returns the batch size (the stages' passes must batch alike) and the rows."""

    feeds = {i.name for i in dense.graph.input}
    fetch = list(dict.fromkeys(l.x for l in layers if l.x not in feeds))
    bs = _batch_size(dense, fetch, inputs, 16)
    sess = session(prefix(dense, fetch))
    rng = np.random.default_rng(seed)
    maps = {l.node: (targets[l.node].m[targets[l.node].outs].astype(np.float32),
                     targets[l.node].b[targets[l.node].outs].astype(np.float32)) for l in layers}
    got: DenseRows = {l.node: [] for l in layers}
    n = len(next(iter(inputs.values())))
    with ProgressBar(n, "calibration: dense targets", enabled=progress, transient=True) as bar:
        for b, outs in run_batches(sess, fetch, inputs, bs, fixed_batch(dense)):
            acts = {**b, **outs}
            m = b.get(mask) if mask else None
            for l in layers:
                x = acts[l.x]
                bi, pos = l.positions(x.shape, per_sample, rng, l.valid_positions(x.shape, m))
                mm, bb = maps[l.node]
                got[l.node].append((bi.astype(np.int32), pos.astype(np.int32), l.rows_at(x, None, bi, pos)[0] @ mm.T + bb))
            bar.advance(len(next(iter(b.values()))))
    return bs, got


def _stage_stats(current: onnx.ModelProto, group: Sequence[Layer], targets: Mapping[str, Target], wanted: DenseRows,
                 inputs: Mapping[str, np.ndarray], bs: int, what: str | bool
                 ) -> tuple[dict[str, RowStats], list[dict[str, Any]]]:
    """One pass of the current model's prefix: per layer, its input rows (X) at the positions of
    ``wanted``, paired with the dense output rows there (Y)."""
    feeds = {i.name for i in current.graph.input}
    fetch = list(dict.fromkeys(l.x for l in group if l.x not in feeds))
    sess = session(prefix(current, fetch))
    stats = {l.node: RowStats(d=len(targets[l.node].cols), out=len(targets[l.node].outs)) for l in group}
    pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {l.node: [] for l in group}
    bad: dict[str, str] = {}
    n = len(next(iter(inputs.values())))
    with ProgressBar(n, str(what), enabled=bool(what), transient=True) as bar:
        for j, (b, outs) in enumerate(run_batches(sess, fetch, inputs, bs, fixed_batch(current))):
            acts = {**b, **outs}
            for l in group:
                if l.node in bad:
                    continue
                bi, pos, y = wanted[l.node][j]
                rc, _ = l.rows_at(acts[l.x], None, bi, pos)
                if rc.shape[1] != stats[l.node].d:
                    bad[l.node] = (f"not re-fitted: its input in the pruned model has {rc.shape[1]} columns, "
                                   f"not the {stats[l.node].d} of the kept channels")
                    continue
                pending[l.node].append((rc, y))
                if sum(x.nbytes for x, _ in pending[l.node]) >= PENDING_BYTES:
                    _flush(stats[l.node], pending[l.node])
            bar.advance(len(next(iter(b.values()))))
    for l in group:
        _flush(stats[l.node], pending[l.node])
    failed = [{"node": k, "reason": v} for k, v in bad.items()]
    return {k: v for k, v in stats.items() if k not in bad and v.n > 0}, failed


def _flush(st: RowStats, rows: list[tuple[np.ndarray, np.ndarray]]) -> None:
    if rows:
        st.add(np.concatenate([x for x, _ in rows]), np.concatenate([y for _, y in rows]))
        rows.clear()
