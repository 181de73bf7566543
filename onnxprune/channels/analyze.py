"""Channel-dependency analysis of a normalized ONNX graph: :func:`analyze_channels`.

Walks the nodes in topological order applying the per-op rule of :mod:`onnxprune.channels.rules`
(see :mod:`onnxprune.channels.context` for atoms, tracks and members), then turns the union-find
state into :class:`~onnxprune.channels.types.Group` objects:

- group channel ``k`` = one class of united atoms; classes are numbered by their first atom, so a
  plain conv's group channel ``k`` is its output channel ``k``; groups with a ``blocks`` constraint
  (grouped convs, GroupNorm) are numbered block by block instead;
- a group is unprunable if any of its atoms was marked bad (first reason wins), or if it reaches a
  model output; it is inexact if a normalization computes statistics across its channels.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from ..graph import GraphView, build_view, subgraph_reads
from ..normalize import fold_constants
from .context import Context
from .rules import rule_for
from .types import Analysis, Group, Member, Positions


def analyze_channels(view: GraphView) -> Analysis:
    """Coupling groups of ``view`` (from :func:`onnxprune.prepare.prepare`; static shapes help:
    reshapes are only followed on static shapes)."""
    ctx = Context(_static_view(view), view)
    for node in ctx.view.model.graph.node:
        if node.name in ctx.skip:
            continue
        try:
            rule_for(node)(ctx, node)
        except Exception as exc:  # noqa: BLE001 - a rule that cannot follow a node never guesses
            reason = f"node {node.name} ({node.op_type}) could not be analysed: {type(exc).__name__}: {exc}"
            for i in node.input:
                tr = ctx.track(i) if i else None
                if tr is not None:
                    ctx.mark_bad(tr.atoms, reason)
            for o in node.output:
                ctx.tracks.pop(o, None)
                ctx.untrack(o, reason)
    for out in view.output_names:
        tr = ctx.track(out)
        if tr is not None:
            ctx.mark_bad(tr.atoms, f"reaches model output {out!r}")
    return _leave_subgraph_reads_whole(_finalize(ctx), view)


def _leave_subgraph_reads_whole(analysis: Analysis, view: GraphView) -> Analysis:
    """(In place.) A group with a member that an If/Loop/Scan body also reads (a shared weight, an
    outer-scope tensor) is unprunable: the rewrite never enters subgraphs, so a cut would leave the
    body reading a tensor of the wrong size."""
    inside = {name: node for node in view.nodes for name in subgraph_reads(node)}
    for g in analysis.groups:
        hit = next((m.tensor for m in g.members if m.tensor in inside), None)
        if g.prunable and hit is not None:
            node = inside[hit]
            g.prunable, g.reason = False, f"{hit!r} is also read inside the {node.op_type} subgraph of node {node.name}"
    return analysis


def _finalize(ctx: Context) -> Analysis:
    n = len(ctx._parent)
    root = _roots(ctx._parent)
    src_root = _roots(ctx._src_parent)
    group_of_atom = src_root[np.asarray(ctx._source, dtype=np.int64)] if n else np.zeros(0, dtype=np.int64)

    # classes of each group, numbered by first atom (a class's root is its smallest atom)
    group_roots = sorted({int(g) for g in src_root[[s for s, (_, c) in enumerate(ctx.source_atoms) if c]]}) \
        if n else []
    classes: dict[int, list[int]] = {g: [] for g in group_roots}
    class_roots = np.flatnonzero(root == np.arange(n))  # ascending
    if len(class_roots):
        owner = group_of_atom[class_roots]
        order = np.argsort(owner, kind="stable")  # by group, ascending atoms within each
        owner_sorted = owner[order]
        cuts = np.flatnonzero(np.diff(owner_sorted)) + 1
        for g, part in zip(owner_sorted[np.concatenate(([0], cuts))].tolist(), np.split(class_roots[order], cuts)):
            classes[g].extend(part.tolist())
    class_index = np.full(n, -1, dtype=np.int64)
    for g, roots in classes.items():
        class_index[np.asarray(roots, dtype=np.int64)] = np.arange(len(roots))
    class_of_atom = class_index[root] if n else class_index

    bad: dict[int, str] = {}
    for a, reason in ctx.bad:
        bad.setdefault(int(group_of_atom[a]), reason)
    inexact: dict[int, str] = {}
    for a, reason in ctx.inexact:
        inexact.setdefault(int(group_of_atom[a]), reason)

    blocks = _apply_constraints(ctx, classes, group_of_atom, class_of_atom, bad)
    for g in blocks:  # renumbered block by block
        class_index[np.asarray(classes[g], dtype=np.int64)] = np.arange(len(classes[g]))
    if n:
        class_of_atom = class_index[root]

    members: dict[int, list[Member]] = {g: [] for g in group_roots}
    keep_one: dict[int, dict[tuple[int, ...], None]] = {g: {} for g in group_roots}
    seen: set[tuple] = set()
    for rm in ctx.members:
        key = (rm.tensor, rm.axis, rm.role, rm.node)
        if key in seen:
            continue
        seen.add(key)
        atoms = rm.atoms
        if not len(atoms):
            continue
        if atoms.min() >= 0 and (ga := group_of_atom[atoms]).min() == ga.max():
            # the usual case: every position carries a channel of one group
            per_group = [(int(ga[0]), np.arange(len(atoms)))]
        else:
            valid = atoms >= 0
            if not valid.any():
                continue
            grp = np.full(len(atoms), -1, dtype=np.int64)
            grp[valid] = group_of_atom[atoms[valid]]
            per_group = [(g, np.nonzero(grp == g)[0]) for g in dict.fromkeys(grp[valid].tolist())]
        for g, pos in per_group:
            ks = class_of_atom[atoms[pos]]
            size = len(classes[g])
            order = np.argsort(ks, kind="stable")
            counts = np.bincount(ks, minlength=size)
            positions = Positions.from_counts(pos[order], counts)
            members[g].append(Member(rm.tensor, rm.axis, positions, rm.role, rm.node, rm.groups))
            if rm.role == "act" and len(pos) == len(atoms):
                held = np.nonzero(counts)[0]
                if len(held) < size:
                    keep_one[g][tuple(held.tolist())] = None

    groups = []
    for new_id, g in enumerate(gr for gr in group_roots if classes[gr]):
        mems = members[g]
        nodes = list(dict.fromkeys(m.node for m in mems))
        groups.append(Group(id=new_id, size=len(classes[g]), members=mems, prunable=g not in bad, reason=bad.get(g),
                            blocks=blocks.get(g, 1), nodes=nodes, exact=g not in inexact,
                            inexact_reason=inexact.get(g), keep_one_of=list(keep_one[g])))
    shapes = {k: tuple(int(d) for d in v) for k, v in ctx.view.shapes.items()
              if v is not None and all(isinstance(d, int) for d in v) and k not in ctx.view.initializers}
    return Analysis(groups=groups, shapes=shapes, values=dict(ctx.values))


def _roots(parent: list[int]) -> np.ndarray:
    """Root of every element of a union-find parent list (pointer jumping, vectorized); the same
    roots as following ``parent`` one element at a time."""
    p = np.asarray(parent, dtype=np.int64)
    while True:
        q = p[p]
        if np.array_equal(q, p):
            return p
        p = q


def _static_view(view: GraphView) -> GraphView:
    """``view`` with its shape computations (Shape -> Gather -> Concat -> Reshape ...) folded into
    constants where the shapes are static, so run-time Reshape targets, Slice bounds and Split sizes
    can be read. Node and tensor names of everything not folded are unchanged."""
    if not any(n.op_type in ("Shape", "Size") for n in view.model.graph.node):
        return view
    m = onnx.ModelProto()
    m.CopyFrom(view.model)
    try:
        for _ in range(8):
            if not fold_constants(m):
                break
        return build_view(m)
    except Exception:  # noqa: BLE001 - folding is a convenience; the plain view is still correct
        return view


def _apply_constraints(ctx: Context, classes: dict[int, list[int]], group_of_atom: np.ndarray,
                       class_of_atom: np.ndarray, bad: dict[int, str]) -> dict[int, int]:
    """Block constraints (grouped convs, GroupNorm) -> ``blocks`` per group, renumbering the group's
    channels block by block (in ``classes``); incompatible constraints make the group unprunable."""
    parts: dict[int, list[tuple[int, np.ndarray, str]]] = {}
    for atoms, g, node in ctx.constraints:
        if g <= 1 or not len(atoms):
            continue
        gids = set(group_of_atom[atoms].tolist())
        if len(gids) > 1:
            for gid in gids:
                bad.setdefault(gid, f"grouped node {node} reads channels of several groups")
            continue
        gid = gids.pop()
        ks = class_of_atom[atoms]
        size = len(classes[gid])
        if len(atoms) % g or len(set(ks.tolist())) != len(ks) or len(ks) != size:
            bad.setdefault(gid, f"grouped node {node}: channels do not map one-to-one onto its {g} groups")
            continue
        parts.setdefault(gid, []).append((g, ks.reshape(g, -1), node))
    blocks: dict[int, int] = {}
    for gid, plist in parts.items():
        if gid in bad:
            continue
        plist.sort(key=lambda t: -t[0])
        big, fine, _ = plist[0]
        ok = True
        for g2, coarse, node in plist[1:]:
            if big % g2:
                ok = False
                break
            r = big // g2
            for j in range(g2):
                if set(coarse[j].tolist()) != set(fine[j * r:(j + 1) * r].ravel().tolist()):
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            bad[gid] = f"grouped nodes {', '.join(sorted({p[2] for p in plist}))} need incompatible channel blocks"
            continue
        order = fine.ravel()  # new channel k = old class order[k]
        old = classes[gid]
        classes[gid] = [old[int(k)] for k in order]
        blocks[gid] = big if math.gcd(big, len(old)) == big else 1
    return blocks
