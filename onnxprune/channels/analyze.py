"""Channel-dependency analysis of a normalized ONNX graph: :func:`analyze_channels`.

Walks the nodes in topological order applying the per-op rule of :mod:`onnxprune.channels.rules`
(see :mod:`onnxprune.channels.context` for atoms, tracks and members), then turns the union-find
state into :class:`~onnxprune.channels.types.Group` objects:

- group channel ``k`` = one class of united atoms; classes are numbered by their first atom, so a
  plain conv's group channel ``k`` is its output channel ``k``; groups with a ``blocks`` constraint
  (grouped convs, GroupNorm) are numbered block by block instead;
- grouped nodes whose channels are spread over their groups (a channel shuffle or a Concat in
  front) have channel ``j`` of every group united first (:func:`_balance_constraints`), so they
  keep ``group`` with equal counts per group;
- run-time shape values read from channels are followed by :mod:`onnxprune.channels.dims`;
- a group is unprunable if any of its atoms was marked bad (first reason wins), or if it reaches a
  model output; it is inexact if a normalization computes statistics across its channels.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx

from ..core.graph import GraphView, build_view, subgraph_reads
from ..core.normalize import fold_constants
from ..core.shapes import symbolic_value_shapes
from .context import Context
from .dims import follow_dims
from .rules import rule_for
from .types import Analysis, Group, Member, Positions


def analyze_channels(view: GraphView, *, allow_io_change: bool = False, prune_hidden: bool = False) -> Analysis:
    """Coupling groups of ``view`` (from :func:`onnxprune.core.prepare.prepare`; static shapes help:
    reshapes are only followed on static shapes).

    ``allow_io_change``: a model input concatenated with tracked channels (a KV cache) and an
    output carrying only channels such an input also carries (the present keys/values) no longer
    fix them; pruning then changes their declared shapes (see ``Analysis.io``). ``prune_hidden``:
    the hidden size that embedding tables start (a transformer's residual stream) is prunable
    where no model input/output fixes it; without it that group is unprunable, saying so."""
    ctx = Context(_static_view(view), view, allow_io_change=allow_io_change, prune_hidden=prune_hidden)
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
    follow_dims(ctx)
    io_roots = {ctx.find(a) for atoms in ctx.io_inputs.values() for a in atoms.tolist()}
    io = {name: ctx.tracks[name].axis for name in ctx.io_inputs}
    for out in view.output_names:
        tr = ctx.track(out)
        if tr is None:
            continue
        if io_roots and all(ctx.find(a) in io_roots for a in tr.atoms.tolist()):
            io[out] = tr.axis  # a cache output: shrinks with the cache input it extends
            continue
        ctx.mark_bad(tr.atoms, f"reaches model output {out!r}")
    analysis = _leave_subgraph_reads_whole(_finalize(ctx), view)
    analysis.io = io
    return analysis


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
    _balance_constraints(ctx)
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
    # static dims as ints; symbolic ones (batch, sequence: never a channel axis) as their names
    shapes = {k: tuple(d if isinstance(d, int) else str(d) for d in v) for k, v in ctx.view.shapes.items()
              if v is not None and all(isinstance(d, (int, str)) for d in v) and k not in ctx.view.initializers}
    return Analysis(groups=groups, shapes=shapes, values=dict(ctx.values), adaptive=dict(ctx.adaptive),
                    pins=dict(ctx.pins))


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
    can be read. Node and tensor names of everything not folded are unchanged. Where symbolic
    inputs leave a reshape's output unknown, ONNX Runtime's symbolic shape inference fills in
    (:func:`_with_symbolic_shapes`)."""
    if not any(n.op_type in ("Shape", "Size") for n in view.model.graph.node):
        return _with_symbolic_shapes(view)
    m = onnx.ModelProto()
    m.CopyFrom(view.model)
    try:
        for _ in range(8):
            if not fold_constants(m):
                break
        folded = build_view(m)
    except Exception:  # noqa: BLE001 - folding is a convenience; the plain view is still correct
        return view
    return _with_symbolic_shapes(folded)


def _unresolved(shape) -> bool:
    return shape is None or any(d is None or (isinstance(d, str) and d.startswith("unk__")) for d in shape)


def _with_symbolic_shapes(view: GraphView) -> GraphView:
    """``view`` with the shapes ONNX leaves unknown (a ``-1`` in a run-time head split between
    symbolic batch and sequence dims) taken from ONNX Runtime's symbolic shape inference, run only
    when a Reshape/Expand output is unresolved or an ONNX Runtime contrib op's output (ONNX
    does not know those ops) is unknown. Only shapes of the same rank with more known dims
    replace ONNX's."""
    if not any((n.op_type in ("Reshape", "Expand") or n.domain == "com.microsoft")
               and _unresolved(view.shapes.get(n.output[0])) for n in view.model.graph.node):
        return view
    sym = symbolic_value_shapes(view.model)
    if not sym:
        return view
    shapes = dict(view.shapes)
    for name, s in sym.items():
        old = shapes.get(name)
        if name in view.initializers or s is None:
            continue
        known = sum(not _unresolved((d,)) for d in s)
        if old is None or (len(old) == len(s) and known > sum(not _unresolved((d,)) for d in old)):
            shapes[name] = s
    return dataclasses.replace(view, shapes=shapes)


def block_layout(classes: np.ndarray, blocks: int) -> np.ndarray | None:
    """How the channel classes at the positions of a grouped node (``blocks`` contiguous blocks of
    positions) constrain removal:

    - an empty array when every class has as many positions in every block (removing any class
      removes the same count from each block: nothing to constrain, e.g. a shuffle's coupled lanes);
    - a ``[blocks, n]`` array of the distinct classes of each block when every class lies in one
      block only, with the same number of positions each (keep equal class counts per block);
    - None otherwise (the counts per block would depend on which classes go).
    """
    if len(classes) % blocks:
        return None
    uniq, inv = np.unique(classes, return_inverse=True)
    block_of = np.repeat(np.arange(blocks), len(classes) // blocks)
    cnt = np.zeros((blocks, len(uniq)), dtype=np.int64)
    np.add.at(cnt, (block_of, inv), 1)
    if (cnt == cnt[:1]).all():
        return np.zeros((blocks, 0), dtype=np.int64)
    present = cnt > 0
    mult = cnt.max(axis=0)
    per_block = present.sum(axis=1)
    if (present.sum(axis=0) != 1).any() or (mult != mult[0]).any() or (per_block != per_block[0]).any():
        return None
    first = np.unique(classes, return_index=True)[1]  # classes in order of first position
    ordered = classes[np.sort(first)]
    return ordered.reshape(blocks, -1)


def _balance_constraints(ctx: Context) -> None:
    """Make every block constraint (grouped convs, GroupNorm) one the groups can express.

    A grouped node whose channels cannot be kept as equal per-block counts of whole group channels
    (a channel shuffle before it spreads each class over several blocks, a Concat feeds it channels
    of two producers, two grouped nodes need blocks that do not nest) has the ``j``-th position of
    every block united: removing one class then removes the same number of positions from each
    block, so the node keeps its ``group`` exactly (importance is summed over the united positions).
    Repeats until every constraint is either free or clean blocks covering its whole group."""
    for _ in range(len(ctx.constraints) + 1):
        root = _roots(ctx._parent)
        src_root = _roots(ctx._src_parent)
        group_of_atom = src_root[np.asarray(ctx._source, dtype=np.int64)]
        class_roots = np.flatnonzero(root == np.arange(len(root)))
        classes_per_group = np.bincount(group_of_atom[class_roots], minlength=len(src_root))
        to_unite: list[int] = []
        clean: dict[int, list[tuple[int, np.ndarray, int]]] = {}
        for idx, (atoms, g, _) in enumerate(ctx.constraints):
            if g <= 1 or not len(atoms) or len(atoms) % g:
                continue
            layout = block_layout(root[atoms], g)
            if layout is not None and not layout.size:
                continue  # free
            gids = np.unique(group_of_atom[atoms])
            if layout is None or len(gids) > 1 or layout.size != classes_per_group[gids[0]]:
                to_unite.append(idx)
                continue
            clean.setdefault(int(gids[0]), []).append((g, layout, idx))
        for plist in clean.values():
            plist.sort(key=lambda t: -t[0])
            big, fine, _ = plist[0]
            for g2, coarse, idx in plist[1:]:
                if not _nests(fine, coarse):
                    to_unite.append(idx)
        if not to_unite:
            return
        for idx in to_unite:
            atoms, g, _ = ctx.constraints[idx]
            cols = np.asarray(atoms, dtype=np.int64).reshape(g, -1)
            for r in range(1, g):
                ctx.unite(cols[0], cols[r])


def _nests(fine: np.ndarray, coarse: np.ndarray) -> bool:
    """True when each block of ``coarse`` is a run of whole blocks of ``fine`` (same classes)."""
    big, g2 = len(fine), len(coarse)
    if big % g2:
        return False
    r = big // g2
    return all(set(coarse[j].tolist()) == set(fine[j * r:(j + 1) * r].ravel().tolist()) for j in range(g2))


def _apply_constraints(ctx: Context, classes: dict[int, list[int]], group_of_atom: np.ndarray,
                       class_of_atom: np.ndarray, bad: dict[int, str]) -> dict[int, int]:
    """Block constraints (grouped convs, GroupNorm) -> ``blocks`` per group, renumbering the group's
    channels block by block (in ``classes``); constraints :func:`_balance_constraints` could not
    make expressible make the group unprunable."""
    parts: dict[int, list[tuple[int, np.ndarray, str]]] = {}
    for atoms, g, node in ctx.constraints:
        if g <= 1 or not len(atoms):
            continue
        gids = set(group_of_atom[atoms].tolist())
        layout = block_layout(class_of_atom[atoms], g)
        if layout is not None and not layout.size:
            continue  # every class spans all blocks equally: nothing to constrain
        if len(gids) > 1:
            for gid in gids:
                bad.setdefault(gid, f"grouped node {node} reads channels of several groups")
            continue
        gid = gids.pop()
        if layout is None or layout.size != len(classes[gid]):
            bad.setdefault(gid, f"grouped node {node}: channels do not map one-to-one onto its {g} groups")
            continue
        parts.setdefault(gid, []).append((g, layout, node))
    blocks: dict[int, int] = {}
    for gid, plist in parts.items():
        if gid in bad:
            continue
        plist.sort(key=lambda t: -t[0])
        big, fine, _ = plist[0]
        if not all(_nests(fine, coarse) for _, coarse, _ in plist[1:]):
            bad[gid] = f"grouped nodes {', '.join(sorted({p[2] for p in plist}))} need incompatible channel blocks"
            continue
        order = fine.ravel()  # new channel k = old class order[k]
        old = classes[gid]
        classes[gid] = [old[int(k)] for k in order]
        blocks[gid] = big if math.gcd(big, len(old)) == big else 1
    return blocks
