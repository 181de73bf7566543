"""Run-time shape values that count channels: where a ``Shape`` of a tracked tensor's channel axis goes.

Exporters compute Reshape/Expand targets at run time (``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape``, tf2onnx's ``BroadcastTo``). An entry read from a channel axis holds the *kept* count
after pruning, so where it goes decides what happens:

- a Reshape/Expand target entry on the axis where the output carries the same channels adapts by
  itself: the rewriter leaves it alone (:attr:`Context.adaptive`), no folding needed;
- a value computed only from channel counts and constants that sizes something pruning leaves
  alone (Swin attention: ``C // heads`` in the qkv reshape, ``head_dim ** -0.5``, the ``attn @ v``
  reshape to C) keeps its original value: the rewriter pins it (:attr:`Context.pins`); where the
  output's own channels are pruned the rewriter still sets the entry to their new count;
- anything else (ConstantOfShape, Range, comparisons, a count mixed with the batch size, an op
  the walk does not know) is refused: the channels counted are unprunable, the node named.

Walks the *original* graph after the channel rules ran (the analysed view has these chains folded
into constants), reading the tracks the rules set. Every shape value gets one entry per element:
None (no channel count), the atoms whose count it equals, or ``(MIXED, atoms, static)`` for a
value computed from channel counts (``static``: from channel counts and constants only).
"""
from __future__ import annotations

import numpy as np
import onnx

from ..core.graph import attr
from .context import Context

#: Marks an entry computed from a channel count by arithmetic (not the count itself).
MIXED = "mixed"

#: Ops computing with shape entries (or, with an activation operand, using one as data).
ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "ReduceProd", "ReduceSum", "Neg", "Abs",
              "Sqrt", "Reciprocal", "Floor", "Ceil")

#: Ops that only move shape entries around (output entries are input entries).
PLUMBING = ("Gather", "Slice", "Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Flatten")


def follow_dims(ctx: Context) -> None:
    """Follow channel counts read by ``Shape`` through the original graph (see module docstring)."""
    dims: dict[str, list] = {}
    view = ctx.original
    for node in view.model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            _refuse_all(ctx, node, dims)
            continue
        if node.op_type == "Shape":
            _shape(ctx, node, dims)
            continue
        if node.op_type == "Size":
            tr = ctx.track(node.input[0])
            dims[node.output[0]] = [None if tr is None else (MIXED, tr.atoms, False)]
            continue
        reading = [(k, i) for k, i in enumerate(node.input) if i in dims]
        if not reading:
            continue
        if node.op_type in ("Reshape", "Expand") and [k for k, _ in reading] == [1]:
            _target(ctx, node, dims)
        elif node.op_type in PLUMBING and [k for k, _ in reading] == [0]:
            out = _plumb(ctx, node, dims[node.input[0]])
            if out is None:
                _refuse_all(ctx, node, dims)
            else:
                dims[node.output[0]] = out
        elif node.op_type == "Concat" and all(k is not None for k in [_length(ctx, i, dims) for i in node.input]):
            out = []
            for i in node.input:
                out.extend(dims[i] if i in dims else [None] * _length(ctx, i, dims))
            dims[node.output[0]] = out
        elif node.op_type == "Mul" and _scaled_count(ctx, node, dims):
            continue
        elif node.op_type == "Equal" and _is_minus_one_test(ctx, node, dims):
            continue  # a count is never -1: the test does not depend on it (torch's expand)
        elif node.op_type == "Where" and _where_minus_one(ctx, node, dims):
            continue
        elif node.op_type in ARITHMETIC and any(_is_activation(view, i, dims) for i in node.input):
            _data_use(ctx, node, dims)
        elif node.op_type in ARITHMETIC:
            _taint(ctx, node, dims)
        elif not all(i in ctx.values for _, i in reading):
            # (values a rule read, such as Slice bounds or Split sizes, the rewriter rewrites)
            _refuse_all(ctx, node, dims)


def _scaled_count(ctx: Context, node: onnx.NodeProto, dims: dict) -> bool:
    """``count * k`` (a positive integer constant): the count of every channel repeated ``k`` times,
    kept as such (``np.repeat(atoms, k)``) so that it adapts where the output carries each channel
    ``k`` times (grouped-query attention's ``reshape(b, kv_heads * n_rep, s, dh)`` after repeat_kv)."""
    ins = [i for i in node.input if i]
    counted = [i for i in ins if i in dims]
    other = [i for i in ins if i not in dims]
    if len(counted) != 1 or len(other) != 1 or len(dims[counted[0]]) != 1:
        return False
    entry, k = dims[counted[0]][0], ctx.original.const(other[0])
    if entry is None or isinstance(entry, tuple) or k is None or np.asarray(k).size != 1:
        return False
    k = np.asarray(k).reshape(-1)[0]
    if not np.issubdtype(np.asarray(k).dtype, np.integer) or int(k) < 1:
        return False
    dims[node.output[0]] = [np.repeat(entry, int(k))]
    return True


def _is_minus_one_test(ctx: Context, node: onnx.NodeProto, dims: dict) -> bool:
    """``Equal(shape, -1)``: how torch exports ``expand(sizes)`` (``Where(sizes == -1, 1, sizes)``)."""
    other = [i for i in node.input if i not in dims]
    value = ctx.original.const(other[0]) if len(other) == 1 else None
    return value is not None and bool((np.asarray(value) == -1).all())


def _where_minus_one(ctx: Context, node: onnx.NodeProto, dims: dict) -> bool:
    """``Where(sizes == -1, ones, sizes)``: every entry holding a count (never -1) is taken from
    ``sizes``, so the output's entries are those of ``sizes``. False for any other Where."""
    cond = ctx.original.producer.get(node.input[0])
    sizes = node.input[2]
    if (cond is None or cond.op_type != "Equal" or sizes not in cond.input or sizes not in dims
            or not _is_minus_one_test(ctx, cond, dims) or node.input[1] in dims and any(
                e is not None for e in dims[node.input[1]])):
        return False
    dims[node.output[0]] = list(dims[sizes])
    return True


def _is_activation(view, name: str, dims: dict) -> bool:
    """A floating-point tensor computed at run time that is not a shape value (an integer one of
    unknown origin is not taken for data: the value is then refused where it goes, never pinned)."""
    if not name or name in dims or view.is_const(name):
        return False
    return view.dtypes.get(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                     onnx.TensorProto.BFLOAT16)


def _data_use(ctx: Context, node: onnx.NodeProto, dims: dict) -> None:
    """A value computed only from channel counts (and constants) enters arithmetic on activations
    (attention's ``q * head_dim ** -0.5``, a mean written as ``sum / C``): it keeps its original
    value, which is what the zeroed-channel model computes; otherwise refused."""
    for k, i in enumerate(node.input):
        if i not in dims:
            continue
        value = ctx.view.const(i)
        if not any(e is not None for e in dims[i]):
            continue  # a batch or spatial size used as data: nothing to do with channels
        if value is not None and all(_static_entry(e) for e in dims[i]):
            ctx.pins[(node.name, k)] = np.asarray(value)
            continue
        for e in dims[i]:
            if e is not None:
                _refuse(ctx, e, f"arithmetic on activations at {node.name} ({node.op_type})")


def _shape(ctx: Context, node: onnx.NodeProto, dims: dict) -> None:
    """``Shape(x)``: the entry of x's channel axis counts its channels (``start``/``end`` from opset 15)."""
    tr = ctx.track(node.input[0])
    rank = ctx.rank(node.input[0])
    if rank is None:
        return
    entries: list = [None] * rank
    if tr is not None:
        entries[tr.axis] = tr.atoms
    start, end = int(attr(node, "start", 0)), attr(node, "end", None)
    dims[node.output[0]] = entries[slice(start, None if end is None else int(end))]


def _length(ctx: Context, name: str, dims: dict) -> int | None:
    if name in dims:
        return len(dims[name])
    v = ctx.original.const(name)
    if v is not None:
        return int(np.asarray(v).size)
    s = ctx.original.shape(name)
    if s is not None and len(s) <= 1 and all(isinstance(d, int) for d in s):
        return int(s[0]) if s else 1
    return None


def _plumb(ctx: Context, node: onnx.NodeProto, entries: list) -> list | None:
    """Entries of the output of a shape-moving op; None when they cannot be followed."""
    op = node.op_type
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape", "Flatten"):
        return list(entries)
    if op == "Gather":
        idx = ctx.original.const(node.input[1])
        if idx is None or int(attr(node, "axis", 0)) != 0:
            return None
        idx = np.asarray(idx).astype(np.int64).reshape(-1)
        return [entries[int(i)] for i in idx]
    if op == "Slice":
        if ctx.opset < 10:
            starts, ends, steps = attr(node, "starts"), attr(node, "ends"), None
        else:
            vals = [ctx.original.const(i) if i else None for i in node.input[1:5]] + [None] * 4
            if any(v is None for v, i in zip(vals, node.input[1:5]) if i):
                return None
            starts, ends, steps = vals[0], vals[1], vals[3]
        if starts is None or ends is None:
            return None
        s, e = int(np.asarray(starts).reshape(-1)[0]), int(np.asarray(ends).reshape(-1)[0])
        st = 1 if steps is None else int(np.asarray(steps).reshape(-1)[0])
        return list(entries)[s:e:st] if st else None
    return None


def _atoms_of(entries: list) -> list[np.ndarray]:
    return [e[1] if isinstance(e, tuple) else e for e in entries if e is not None]


def _taint(ctx: Context, node: onnx.NodeProto, dims: dict) -> None:
    """Arithmetic on shape entries: the result depends on channel counts without being one. It is
    *static* (may be pinned where used) when every operand is a channel count or a constant."""
    atoms = [a for i in node.input if i in dims for a in _atoms_of(dims[i])]
    n = _length(ctx, node.output[0], dims) or 1
    if not atoms:
        dims[node.output[0]] = [None] * n  # still a shape value
        return
    static = all((i in dims and all(e is not None and (not isinstance(e, tuple) or e[2]) for e in dims[i]))
                 or ctx.original.is_const(i) for i in node.input if i)
    dims[node.output[0]] = [(MIXED, np.concatenate(atoms), static)] * n


def _refuse_all(ctx: Context, node: onnx.NodeProto, dims: dict) -> None:
    for i in node.input:
        if i in dims:
            for e in dims[i]:
                if e is not None:
                    _refuse(ctx, e, f"a size computed at run time by {node.name} ({node.op_type})")


def _refuse(ctx: Context, entry, what: str) -> None:
    atoms = entry[1] if isinstance(entry, tuple) else entry
    how = "a value computed from their count" if isinstance(entry, tuple) else "their count"
    ctx.mark_bad(atoms, f"{how} is read at run time (Shape) into {what}, which pruning would change")


def _static_entry(e) -> bool:
    return e is not None and (not isinstance(e, tuple) or e[2])


def _target(ctx: Context, node: onnx.NodeProto, dims: dict) -> None:
    """Run-time Reshape/Expand target. A channel count landing on the output's channel axis, where
    the output carries the same channels, adapts by itself. Any other static channel-derived entry
    keeps its original value (:attr:`Context.pins`): where the output carries no channels pruning
    leaves that size alone, and where it carries other channels the rewriter sets the entry to
    their kept count when they go. Entries mixed with run-time sizes are refused."""
    y = node.output[0]
    tr = ctx.track(y)
    ro = ctx.rank(y)
    entries = dims[node.input[1]]
    for i, e in enumerate(entries):
        if e is None:
            continue
        oax = i if node.op_type == "Reshape" or ro is None else i + ro - len(entries)
        if not isinstance(e, tuple) and tr is not None and tr.axis == oax and _same_channels(ctx, e, tr.atoms):
            ctx.adaptive.setdefault(node.name, set()).add(i)
            continue
        if _pin(ctx, node, i, dims):  # the rewriter still sets it when the output's own channels go
            continue
        there = "carries other channels there" if tr is not None and tr.axis == oax else "carries no channels there"
        what = f"the target shape of {node.name} ({node.op_type}), whose output {y!r} {there}"
        _refuse(ctx, e, what)


def _same_channels(ctx: Context, a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` hold the same channels (as many of each class): equal counts kept."""
    if len(a) != len(b):
        return False
    return bool(np.array_equal(np.sort([ctx.find(int(x)) for x in a]), np.sort([ctx.find(int(x)) for x in b])))


def _pin(ctx: Context, node: onnx.NodeProto, i: int, dims: dict) -> bool:
    """Pin entry ``i`` of ``node``'s run-time target to its analysed value: the whole target when
    every entry is a static channel-derived value, else the Concat piece holding it (a piece of
    static channel-derived values only, its Concat read by ``node`` alone). False when neither."""
    target = node.input[1]
    entries = dims[target]
    if not _static_entry(entries[i]):
        return False
    value = ctx.view.const(target)
    if value is None:
        return False
    value = np.asarray(value).astype(np.int64).reshape(-1)
    if all(_static_entry(x) for x in entries):
        ctx.pins[(node.name, 1)] = value
        return True
    prod = ctx.original.producer.get(target)
    if prod is None or prod.op_type != "Concat" or len(ctx.original.consumers.get(target, [])) != 1:
        return False
    off = 0
    for j, piece in enumerate(prod.input):
        n = _length(ctx, piece, dims)
        if n is None:
            return False
        if off <= i < off + n:
            sub = entries[off:off + n]
            if not all(_static_entry(x) for x in sub):
                return False
            ctx.pins[(prod.name, j)] = value[off:off + n]
            return True
        off += n
    return False
