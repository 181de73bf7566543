"""One small rule per op type: how channels flow through a node (the table :data:`RULES`).

Each rule reads the tracks of the node's inputs from a :class:`~onnxprune.channels.context.Context`
and, in order of what it can do:

- records **members** — weights that produce ("out") or consume ("in") the channels, per-channel
  parameters ("param") — that the rewriter slices;
- **unites** atoms that must go together (operands of a residual Add);
- sets the **track** of its outputs (which axis carries which channels);
- or marks channels **bad** with a reason naming the node when it cannot be exact.

Ops without a rule go through :func:`rule_unknown`: every channel flowing into them is unprunable.
Only the default ONNX domain and a few of ONNX Runtime's com.microsoft ops (:data:`CONTRIB_RULES`)
have rules; other custom domains are unknown by construction.

Axes are non-negative everywhere (rules normalize attribute axes with the tensor's rank).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx

from ..core.graph import attr
from .context import Context

Rule = Callable[[Context, onnx.NodeProto], None]


def _where(node: onnx.NodeProto) -> str:
    return f"node {node.name} ({node.op_type})"


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _untrack_outputs(ctx: Context, node: onnx.NodeProto, reason: str) -> None:
    for o in node.output:
        ctx.untrack(o, reason)


def _untracked_inputs_reason(ctx: Context, node: onnx.NodeProto) -> str:
    """Why the outputs of a node with only untracked inputs are untracked (model input, ...)."""
    for i in node.input:
        if i and i in ctx.untracked_reason:
            return ctx.untracked_reason[i]
    return f"output of {_where(node)} carries no tracked channels"


def _mark_inputs_bad(ctx: Context, node: onnx.NodeProto, reason: str, inputs=None) -> None:
    for i in (node.input if inputs is None else inputs):
        tr = ctx.track(i) if i else None
        if tr is not None:
            ctx.mark_bad(tr.atoms, reason)


# ------------------------------------------------------------------------------------ fallback
def rule_unknown(ctx: Context, node: onnx.NodeProto) -> None:
    """Unknown op or custom domain: channels flowing in are unprunable; outputs are opaque."""
    what = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    reason = f"flows into unsupported op {what} (node {node.name})"
    _mark_inputs_bad(ctx, node, reason)
    _mark_inputs_bad(ctx, node, reason, inputs=sorted(_subgraph_names(node)))  # outer-scope reads of If/Loop
    _untrack_outputs(ctx, node, f"output of unsupported op {what} (node {node.name})")


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name read inside the subgraphs of ``node`` (If/Loop/Scan bodies, recursively)."""
    names: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= _subgraph_names(n)
    return names


def _opaque(ctx: Context, node: onnx.NodeProto, why: str) -> None:
    """A supported op used in a way the analysis cannot follow exactly."""
    _mark_inputs_bad(ctx, node, f"{_where(node)}: {why}")
    _untrack_outputs(ctx, node, f"output of {_where(node)}: {why}")


def rule_shape_reader(ctx: Context, node: onnx.NodeProto) -> None:
    """Shape/Size/...: read only dimensions (which adapt after pruning); outputs carry no channels."""
    _untrack_outputs(ctx, node, f"output of {_where(node)} (a shape computation)")


def rule_source(ctx: Context, node: onnx.NodeProto) -> None:
    """Ops creating tensors from nothing or from shapes (ConstantOfShape, Range, ...)."""
    _untrack_outputs(ctx, node, f"output of {_where(node)}")


# ------------------------------------------------------------------------------------ pass-through
def rule_passthrough(ctx: Context, node: onnx.NodeProto) -> None:
    """Unary elementwise ops (activations, Cast, Identity, Dropout, Clip with scalar bounds ...):
    the output carries the input's channels on the same axis."""
    x = node.input[0]
    tr = ctx.track(x)
    if tr is None:
        _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
        return
    ctx.set_track(node.output[0], tr.axis, tr.atoms, node)
    for extra in node.output[1:]:  # Dropout mask etc.: same layout when used
        if extra and ctx.view.consumers.get(extra):
            ctx.mark_bad(tr.atoms, f"{_where(node)}: secondary output {extra!r} is used")


def rule_clip(ctx: Context, node: onnx.NodeProto) -> None:
    """Clip: pass-through; min/max (inputs from opset 11, attributes before) must be scalars."""
    for b in node.input[1:]:
        if b and (ctx.const(b) is None or ctx.const(b).size != 1):
            return _elementwise(ctx, node, [i for i in node.input if i])
    rule_passthrough(ctx, node)


def rule_pool(ctx: Context, node: onnx.NodeProto) -> None:
    """Max/Average/Lp pooling and their Global forms: per channel over axes 2+; channels on axis 1."""
    tr = ctx.track(node.input[0])
    if tr is None:
        _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
        return
    if tr.axis >= 2:
        return _opaque(ctx, node, f"pools over axis {tr.axis}, which holds the channels")
    for o in node.output[:1]:
        ctx.set_track(o, tr.axis, tr.atoms, node)
    if len(node.output) > 1 and node.output[1] and ctx.view.consumers.get(node.output[1]):
        ctx.mark_bad(tr.atoms, f"{_where(node)}: pooling indices output is used")


def rule_softmax(ctx: Context, node: onnx.NodeProto) -> None:
    """Softmax/LogSoftmax/Hardmax: fine unless normalizing over the channel axis (before opset 13 the
    op flattens every axis from ``axis`` on, so those count too)."""
    tr = ctx.track(node.input[0])
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(node.input[0])
    if rank is None:
        return _opaque(ctx, node, "unknown rank")
    default = -1 if ctx.opset >= 13 else 1
    axis = _norm_axis(int(attr(node, "axis", default)), rank)
    if (ctx.opset >= 13 and tr.axis == axis) or (ctx.opset < 13 and tr.axis >= axis):
        return _opaque(ctx, node, "normalizes over the channel axis")
    ctx.set_track(node.output[0], tr.axis, tr.atoms, node)


_REDUCE_AXES_INPUT_OPSET = {"ReduceSum": 13}


def rule_reduce(ctx: Context, node: onnx.NodeProto) -> None:
    """Reduce*: over non-channel axes a pass-through (the channel axis shifts when ``keepdims=0``);
    over the channel axis an *inexact* statistic (its output carries no channels)."""
    tr = ctx.track(node.input[0])
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(node.input[0])
    if rank is None:
        return _opaque(ctx, node, "unknown rank")
    from_input = ctx.opset >= _REDUCE_AXES_INPUT_OPSET.get(node.op_type, 18)
    if from_input:
        if len(node.input) > 1 and node.input[1] and ctx.const(node.input[1]) is None:
            return _opaque(ctx, node, "axes are computed at run time")
        axes = ctx.int_list(node, 1, "__none__")
    else:
        axes = attr(node, "axes")
        axes = None if axes is None else [int(a) for a in axes]
    if not axes:
        if from_input and int(attr(node, "noop_with_empty_axes", 0)):
            return ctx.set_track(node.output[0], tr.axis, tr.atoms, node)
        axes = list(range(rank))
    axes = sorted(_norm_axis(a, rank) for a in axes)
    if tr.axis in axes:
        # a statistic over the channels (decomposed LayerNorm, channel-mean attention): the result has
        # no channel axis left, and removing channels changes it only numerically, like LayerNorm
        ctx.mark_inexact(tr.atoms, f"{_where(node)} computes a statistic over the channel axis")
        _hidden_needs_opt_in(ctx, node, tr.atoms, tr.axis, rank)  # a decomposed LayerNorm / RMSNorm
        return _untrack_outputs(ctx, node, f"output of {_where(node)} (a statistic over channels)")
    keep = int(attr(node, "keepdims", 1))
    out_axis = tr.axis if keep else tr.axis - sum(a < tr.axis for a in axes)
    ctx.set_track(node.output[0], out_axis, tr.atoms, node)


def rule_argreduce(ctx: Context, node: onnx.NodeProto) -> None:
    """ArgMax/ArgMin over one non-channel axis."""
    tr = ctx.track(node.input[0])
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(node.input[0])
    axis = _norm_axis(int(attr(node, "axis", 0)), rank)
    if axis == tr.axis:
        return _opaque(ctx, node, "reduces over the channel axis")
    keep = int(attr(node, "keepdims", 1))
    ctx.set_track(node.output[0], tr.axis if keep or tr.axis < axis else tr.axis - 1, tr.atoms, node)


def rule_pad(ctx: Context, node: onnx.NodeProto) -> None:
    """Pad: fine when nothing is padded on the channel axis (pads from input 1, or the attribute
    before opset 11; optional ``axes`` input from opset 18)."""
    tr = ctx.track(node.input[0])
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(node.input[0])
    if ctx.opset >= 11:
        if len(node.input) < 2 or ctx.const(node.input[1]) is None:
            return _opaque(ctx, node, "pads are computed at run time")
        pads = [int(v) for v in ctx.const(node.input[1]).reshape(-1)]
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            if ctx.const(node.input[3]) is None:
                return _opaque(ctx, node, "axes are computed at run time")
            axes = [_norm_axis(int(a), rank) for a in ctx.const(node.input[3]).reshape(-1)]
    else:
        pads = [int(v) for v in attr(node, "pads", attr(node, "paddings", []))]
        axes = list(range(rank))
    n = len(axes)
    for i, a in enumerate(axes):
        if a == tr.axis and (pads[i] != 0 or pads[i + n] != 0):
            return _opaque(ctx, node, "pads the channel axis")
    ctx.set_track(node.output[0], tr.axis, tr.atoms, node)


def rule_resize(ctx: Context, node: onnx.NodeProto) -> None:
    """Resize/Upsample: per channel when the channel axis keeps its size (scale 1 / same size)."""
    tr = ctx.track(node.input[0])
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    c_in, c_out = ctx.dim(node.input[0], tr.axis), ctx.dim(node.output[0], tr.axis)
    axes = attr(node, "axes")
    if axes is not None:  # opset 18: scales/sizes only for these axes
        rank = ctx.rank(node.input[0])
        if tr.axis not in [_norm_axis(int(a), rank) for a in axes]:
            return ctx.set_track(node.output[0], tr.axis, tr.atoms, node)
    if c_in is None or c_out is None or c_in != c_out:
        return _opaque(ctx, node, "resizes the channel axis" if c_in and c_out else "output channel count unknown")
    if node.op_type == "Resize" and node.input[-1] and len(node.input) >= 4 and ctx.const(node.input[3]) is None:
        return _opaque(ctx, node, "sizes are computed at run time")
    ctx.set_track(node.output[0], tr.axis, tr.atoms, node)


# ------------------------------------------------------------------------------------ elementwise
def _elementwise(ctx: Context, node: onnx.NodeProto, inputs: list[str]) -> None:
    """Broadcasting elementwise ops: operands whose channel axes line up are united; constants with a
    per-channel dim become "param" members (so does a table read at run time, :func:`runtime_table`;
    a value constant only at the analysed shapes cannot be sliced: unprunable); broadcast (size-1 or
    missing) dims pass through."""
    out = node.output[0]
    ranks = [ctx.rank(i) for i in inputs]
    out_rank = ctx.rank(out)
    if out_rank is None:
        out_rank = max((r for r in ranks if r is not None), default=None)
    tracked = [(i, ctx.track(i), r) for i, r in zip(inputs, ranks) if ctx.track(i) is not None]
    if not tracked:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    if out_rank is None or any(r is None for r in ranks):
        return _opaque(ctx, node, "unknown operand rank")
    # primary: a tracked operand that is not broadcast on its channel axis
    primary = None
    for name, tr, r in tracked:
        if ctx.dim(name, tr.axis) == ctx.dim(out, tr.axis + out_rank - r):
            primary = (name, tr, r)
            break
    if primary is None:
        return _opaque(ctx, node, "tracked channels are broadcast")
    _, ptr, pr = primary
    oax = ptr.axis + out_rank - pr
    c = ctx.dim(out, oax)
    atoms = ptr.atoms
    for name, r in zip(inputs, ranks):
        ax = oax - (out_rank - r)
        d = ctx.dim(name, ax) if 0 <= ax < r else 1
        tr = ctx.track(name)
        if tr is None:
            if d == 1 and c != 1:
                continue  # broadcast over the channels: no coupling
            table = runtime_table(ctx, name)
            if table is not None and table[2]:  # positional tables; an expanded constant is refused below
                _table_param(ctx, node, name, table, ax, atoms)
                continue
            if ctx.is_const(name) and not ctx.original.is_const(name) and name not in ctx.qweights:
                ctx.mark_bad(atoms, f"combined at {_where(node)} with {name!r}, computed at run time (constant "
                                    "only at the analysed input shapes)")
                continue
            if ctx.is_const(name):
                if d == c:
                    ctx.add_member(name, ax, atoms, "param", node)
                else:
                    ctx.mark_bad(atoms, f"{_where(node)}: constant {name!r} does not line up with the channels")
                continue
            if c == 1 and d == 1:
                continue
            ctx.mark_bad(atoms, f"combined at {_where(node)} with {name!r}: {ctx.reason_of(name)}")
            continue
        iax = tr.axis + out_rank - r
        if iax == oax:
            if d == c:
                ctx.unite(atoms, tr.atoms)
            else:
                ctx.mark_bad(tr.atoms, f"{_where(node)}: channels of {name!r} are broadcast over {c} channels")
        else:
            ctx.mark_bad(tr.atoms, f"{_where(node)}: operands carry channels on different axes")
            if d == c and c != 1:
                ctx.mark_bad(atoms, f"{_where(node)}: operands carry channels on different axes")
    ctx.set_track(out, oax, atoms, node)


def runtime_table(ctx: Context, name: str) -> tuple[str, set[int], bool] | None:
    """``(table, axes cut, positional)`` when ``name`` is read from a float constant table at run
    time in the model, whether or not the given input shapes fold it in the analysed view:
    - a Slice whose bounds are computed at run time (Hugging Face Whisper's
      ``embed_positions.weight[:T]``, ``T`` read by ``Shape``): positional;
    - a Gather of its rows by run-time ids (BERT's ``position_embeddings(position_ids[:, :S])``):
      positional;
    - an Expand of it to a run-time shape (Hugging Face ViT's ``cls_token.expand(batch, -1, -1)``):
      no axis cut, not positional."""
    node = ctx.original.producer.get(name)
    if node is None or not node.input or not ctx.original.is_const(node.input[0]):
        return None
    w = ctx.original.const(node.input[0])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return None
    if node.op_type == "Expand":
        return (node.input[0], set(), False) if not ctx.original.is_const(node.input[1]) else None
    if node.op_type == "Gather":
        if w.ndim != 2 or int(attr(node, "axis", 0)) not in (0, -2) or ctx.original.is_const(node.input[1]):
            return None
        return node.input[0], {0}, True
    if node.op_type != "Slice" or ctx.opset < 10 or len(node.input) < 4 or not node.input[3]:
        return None
    axes = ctx.original.const(node.input[3])
    if axes is None or all(ctx.original.is_const(i) for i in node.input[1:] if i):
        return None
    return node.input[0], {_norm_axis(int(a), w.ndim) for a in np.asarray(axes).reshape(-1)}, True


def _table_param(ctx: Context, node: onnx.NodeProto, name: str, table: tuple[str, set[int], bool], ax: int,
                 atoms: np.ndarray) -> None:
    """A table read at run time (:func:`runtime_table`) combined with tracked channels on an axis
    the read leaves whole (``ax`` of ``name``; the table's trailing axes line up with ``name``'s):
    the table is a "param" member on that axis, as a constant would be. A positional table added to
    the stream marks it as the hidden size, which prunes only with ``--prune-hidden`` (as for
    embedding tables)."""
    tensor, cut, positional = table
    dims = ctx.original.const(tensor).shape
    tax = ax - ((ctx.rank(name) or len(dims)) - len(dims))
    shared = len(ctx.original.consumers.get(name, [])) != 1
    if not 0 <= tax < len(dims) or dims[tax] != len(atoms) or tax in cut or shared:
        return ctx.mark_bad(atoms, f"combined at {_where(node)} with {name!r}, read from {tensor!r} at run time "
                                   "in a way that does not line up with the channels")
    ctx.add_member(tensor, tax, atoms, "param", node)
    if positional and not ctx.prune_hidden:
        ctx.mark_bad(atoms, f"{_where(node)}: the hidden size (columns of positional table {tensor!r}, read at "
                            "the run-time positions) prunes only with --prune-hidden")


def rule_elementwise(ctx: Context, node: onnx.NodeProto) -> None:
    """Add/Sub/Mul/Div/Pow/Max/Min/Sum/Mean/PRelu/Where/comparisons: see :func:`_elementwise`."""
    _elementwise(ctx, node, [i for i in node.input if i])


# ------------------------------------------------------------------------------------ producers
def _grouped_members(ctx: Context, node: onnx.NodeProto, x: str, w_name: str, g: int, cout: int,
                     *, in_axis: int, out_axis: int) -> np.ndarray:
    """Conv/ConvTranspose that is not depthwise: weight ``in_axis`` consumes the input's channels,
    ``out_axis`` produces ``cout`` new ones. Grouped (``g > 1``): both sides keep equal counts in
    their ``g`` blocks, and the member on weight axis 1 (one group's span) has ``groups = g``."""
    xin = ctx.atoms_on(x, 1, node, need=g > 1)
    if xin is not None:
        ctx.add_member(w_name, in_axis, xin, "in", node, groups=g if in_axis == 1 else 1)
        if g > 1:
            ctx.require_blocks(xin, g, node)
    out = ctx.new_atoms(cout)
    ctx.add_member(w_name, out_axis, out, "out", node, groups=g if out_axis == 1 else 1)
    if g > 1:
        ctx.require_blocks(out, g, node)
    return out


def rule_conv(ctx: Context, node: onnx.NodeProto) -> None:
    """Conv, weight ``[Cout, Cin/g, k...]`` on channels at axis 1.

    - ``g == 1``: weight axis 1 consumes the input channels ("in"); axis 0 and the bias produce new ones.
    - depthwise (``g == Cin``, one input channel per group): output channel ``o`` is input channel
      ``o // m`` (``m = Cout / Cin``); the weight rows and bias go with the input's channels and
      ``group`` is rewritten to the kept count.
    - general grouped: like ``g == 1`` but input and output channels each keep equal counts in
      their ``g`` blocks (``blocks``), and the "in" member has ``groups = g``.
    """
    x, w_name = node.input[0], node.input[1]
    b_name = node.input[2] if len(node.input) > 2 else ""
    w = ctx.const(w_name)
    if w is None:
        return _opaque(ctx, node, "weight is not a constant")
    g = int(attr(node, "group", 1))
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    cin = cin_g * g
    if b_name and ctx.const(b_name) is None:
        return _opaque(ctx, node, "bias is not a constant")
    if g > 1 and cin_g == 1:  # depthwise (channel multiplier m)
        xin = ctx.atoms_on(x, 1, node)
        if xin is None:
            return _opaque(ctx, node, "input channel count unknown")
        out = np.repeat(xin, cout // cin)
        ctx.add_member(w_name, 0, out, "out", node)
    else:
        out = _grouped_members(ctx, node, x, w_name, g, cout, in_axis=1, out_axis=0)
    if b_name:
        ctx.add_member(b_name, 0, out, "param", node)
    ctx.set_track(node.output[0], 1, out, node)


def rule_conv_transpose(ctx: Context, node: onnx.NodeProto) -> None:
    """ConvTranspose, weight ``[Cin, Cout/g, k...]``: axis 0 consumes the input channels, axis 1
    produces the output ones (depthwise: coupled like Conv; grouped: blocks, "out" member ``groups = g``)."""
    x, w_name = node.input[0], node.input[1]
    b_name = node.input[2] if len(node.input) > 2 else ""
    w = ctx.const(w_name)
    if w is None or (b_name and ctx.const(b_name) is None):
        return _opaque(ctx, node, "weight or bias is not a constant")
    g = int(attr(node, "group", 1))
    cin, cout_g = int(w.shape[0]), int(w.shape[1])
    if g > 1 and cin == g and cout_g == 1:  # depthwise
        xin = ctx.atoms_on(x, 1, node)
        if xin is None:
            return _opaque(ctx, node, "input channel count unknown")
        out = xin
        ctx.add_member(w_name, 0, out, "out", node)
    else:
        out = _grouped_members(ctx, node, x, w_name, g, cout_g * g, in_axis=0, out_axis=1)
    if b_name:
        ctx.add_member(b_name, 0, out, "param", node)
    ctx.set_track(node.output[0], 1, out, node)


def rule_gemm(ctx: Context, node: onnx.NodeProto) -> None:
    """Gemm ``Y = A' B' + C`` with a constant B (a linear layer): B's K axis consumes A's channels
    (axis 1 of A, or 0 with ``transA``), its N axis produces new ones; C is a per-channel "param"
    when it has N entries on its last axis."""
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    bw = ctx.const(b)
    if bw is None:
        return _opaque(ctx, node, "B is not a constant")
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    k_axis_b, n_axis_b = (1, 0) if trans_b else (0, 1)
    k_axis_a = 0 if trans_a else 1
    tr = ctx.track(a)
    if tr is not None and tr.axis != k_axis_a:
        ctx.mark_bad(tr.atoms, f"{_where(node)}: channels on the rows of a Gemm")
    xin = ctx.atoms_on(a, k_axis_a, node, need=False) if tr is not None and tr.axis == k_axis_a else None
    if xin is not None:
        ctx.add_member(b, k_axis_b, xin, "in", node)
    out = ctx.new_atoms(int(bw.shape[n_axis_b]))
    ctx.add_member(b, n_axis_b, out, "out", node)
    if c:
        cv = ctx.const(c)
        if cv is None:
            ctx.mark_bad(out, f"{_where(node)}: C is not a constant")
            _mark_inputs_bad(ctx, node, f"{_where(node)}: added as C", inputs=[c])
        elif cv.ndim >= 1 and cv.shape[-1] == len(out) and len(out) > 1:
            ctx.add_member(c, cv.ndim - 1, out, "param", node)
        elif cv.ndim >= 1 and cv.shape[-1] not in (1, len(out)):
            ctx.mark_bad(out, f"{_where(node)}: C does not line up with the output channels")
    ctx.set_track(node.output[0], 1, out, node)


def rule_matmul(ctx: Context, node: onnx.NodeProto) -> None:
    """MatMul ``A[..., M, K] @ B[..., K, N]`` (numpy semantics).

    - constant B (linear layer, 2-D or batched weight): B's axis -2 consumes A's last-axis channels,
      axis -1 produces new ones; if A's channels sit on another axis they pass through and the
      output columns are not tracked.
    - constant A: mirrored (``W @ X``).
    - two activations (attention): channels on a contracted axis (K) are unprunable (they would only
      be exact by also zeroing the producers); channels on the free axes pass through (``attn @ V``).
    """
    a, b = node.input[0], node.input[1]
    ra, rb, ro = ctx.rank(a), ctx.rank(b), ctx.rank(node.output[0])
    if ra is None or rb is None or ro is None:
        return _opaque(ctx, node, "unknown operand rank")
    if ra == 1 or rb == 1:
        return _opaque(ctx, node, "1-D operand")
    ta, tb = ctx.track(a), ctx.track(b)
    aw, bw = ctx.const(a), ctx.const(b)
    if bw is not None and aw is None:
        if ta is not None and ta.axis == ra - 1:
            ctx.add_member(b, rb - 2, ta.atoms, "in", node)
        elif ta is not None and ta.axis == ra - 2:
            ctx.mark_bad(ta.atoms, f"{_where(node)}: channels on the rows of a MatMul")
        elif ta is not None:  # a batch axis carries the channels: they pass through
            return ctx.set_track(node.output[0], ta.axis + ro - ra, ta.atoms, node)
        out = ctx.new_atoms(int(bw.shape[-1]))
        ctx.add_member(b, rb - 1, out, "out", node)
        return ctx.set_track(node.output[0], ro - 1, out, node)
    if aw is not None and bw is None:
        if tb is not None and tb.axis == rb - 2:
            ctx.add_member(a, ra - 1, tb.atoms, "in", node)
        elif tb is not None and tb.axis == rb - 1:
            ctx.mark_bad(tb.atoms, f"{_where(node)}: channels on the columns of a W @ X MatMul")
        elif tb is not None:
            return ctx.set_track(node.output[0], tb.axis + ro - rb, tb.atoms, node)
        out = ctx.new_atoms(int(aw.shape[-2]))
        ctx.add_member(a, ra - 2, out, "out", node)
        return ctx.set_track(node.output[0], ro - 2, out, node)
    if aw is not None and bw is not None:
        return _untrack_outputs(ctx, node, f"output of {_where(node)}")
    # two activations (attention): batch axes broadcast like an elementwise op (attention heads);
    # channels on the contracted axis K cannot be removed exactly; free axes (M of A, N of B) pass
    found = []  # (output axis, atoms, operand)
    for name, t, r, contracted, free, free_out in ((a, ta, ra, ra - 1, ra - 2, ro - 2), (b, tb, rb, rb - 2, rb - 1, ro - 1)):
        if t is None:
            continue
        if t.axis == contracted:
            ctx.mark_bad(t.atoms, f"{_where(node)}: channels contracted with another activation (attention)")
        elif t.axis == free:
            found.append((free_out, t.atoms, name))
        else:
            found.append((t.axis + ro - r, t.atoms, name))
    if not found:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node) if ta is None and tb is None
                                else f"output of {_where(node)} (contraction)")
    oax, atoms, _ = found[0]
    for other_ax, other_atoms, name in found[1:]:
        if other_ax == oax and len(other_atoms) == len(atoms):
            ctx.unite(atoms, other_atoms)
        else:
            ctx.mark_bad(other_atoms, f"{_where(node)}: operands carry channels on different axes")
            ctx.mark_bad(atoms, f"{_where(node)}: operands carry channels on different axes")
    if oax < ro - 2:  # a batch axis: an untracked operand must broadcast over it
        for name, t, r in ((a, ta, ra), (b, tb, rb)):
            ax = oax - (ro - r)
            if t is None and 0 <= ax < r - 2 and ctx.dim(name, ax) != 1:
                ctx.mark_bad(atoms, f"combined at {_where(node)} with {name!r}: {ctx.reason_of(name)}")
    ctx.set_track(node.output[0], oax, atoms, node)


# ------------------------------------------------------------------------------------ normalizations
def _channel_norm(ctx: Context, node: onnx.NodeProto, params: list[str], *, exact: bool, why: str = "") -> None:
    """Normalizations with per-channel parameters on axis 1 of the input (axis 0 of the params)."""
    x = node.input[0]
    xin = ctx.atoms_on(x, 1, node, need=False)
    if xin is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    for p in params:
        if not p:
            continue
        v = ctx.const(p)
        if v is None:
            ctx.mark_bad(xin, f"{_where(node)}: parameter {p!r} is not a constant")
            _mark_inputs_bad(ctx, node, f"{_where(node)}: used as a parameter", inputs=[p])
        elif v.ndim >= 1 and v.shape[0] == len(xin):
            ctx.add_member(p, 0, xin, "param", node)
    if not exact:
        ctx.mark_inexact(xin, f"{_where(node)} {why}")
    ctx.set_track(node.output[0], 1, xin, node)
    for extra in node.output[1:]:
        if extra and ctx.view.consumers.get(extra):
            ctx.mark_bad(xin, f"{_where(node)}: training-mode output {extra!r} is used")


def rule_batchnorm(ctx: Context, node: onnx.NodeProto) -> None:
    """BatchNormalization: scale, bias, mean, var are per-channel "param" members."""
    _channel_norm(ctx, node, list(node.input[1:5]), exact=True)


def rule_instancenorm(ctx: Context, node: onnx.NodeProto) -> None:
    """InstanceNormalization: statistics per channel (exact); scale and bias are "param" members."""
    _channel_norm(ctx, node, list(node.input[1:3]), exact=True)


def rule_groupnorm(ctx: Context, node: onnx.NodeProto) -> None:
    """GroupNormalization (opset 18+): channels in ``num_groups`` blocks that must keep equal counts;
    per-channel scale/bias (opset 21; per-group in 18, untouched). Statistics span channels: inexact."""
    x = node.input[0]
    xin = ctx.atoms_on(x, 1, node, need=False)
    if xin is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    ctx.require_blocks(xin, int(attr(node, "num_groups", 1)), node)
    _channel_norm(ctx, node, list(node.input[1:3]), exact=False, why="normalizes over groups of channels")


def rule_layernorm(ctx: Context, node: onnx.NodeProto) -> None:
    """LayerNormalization over axes ``axis..`` : when the channel axis is normalized, scale and bias
    (aligned from the right) are "param" members and the group is inexact (statistics span the
    channels); otherwise a pass-through."""
    x = node.input[0]
    tr = ctx.track(x)
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(x)
    axis = _norm_axis(int(attr(node, "axis", -1)), rank)
    if tr.axis >= axis:
        for p in node.input[1:3]:
            if not p:
                continue
            v = ctx.const(p)
            if v is None:
                ctx.mark_bad(tr.atoms, f"{_where(node)}: parameter {p!r} is not a constant")
                _mark_inputs_bad(ctx, node, f"{_where(node)}: used as a parameter", inputs=[p])
                continue
            pax = tr.axis - (rank - v.ndim)
            if 0 <= pax < v.ndim and v.shape[pax] == len(tr.atoms) and len(tr.atoms) > 1:
                ctx.add_member(p, pax, tr.atoms, "param", node)
        ctx.mark_inexact(tr.atoms, f"{_where(node)} normalizes over the channel axis")
        _hidden_needs_opt_in(ctx, node, tr.atoms, tr.axis, rank)
    ctx.set_track(node.output[0], tr.axis, tr.atoms, node)
    for extra in node.output[1:]:
        if extra and ctx.view.consumers.get(extra):
            ctx.mark_bad(tr.atoms, f"{_where(node)}: statistics output {extra!r} is used")


def _hidden_needs_opt_in(ctx: Context, node: onnx.NodeProto, atoms: np.ndarray, axis: int, rank: int) -> None:
    """In a transformer (:attr:`Context.has_attention`) the channels a norm normalizes on the last
    axis of ``[batch, sequence, hidden]`` are the residual stream: it reaches every layer and pruning
    it is inexact, so, as for embedding tables, only ``--prune-hidden`` lets it go (a ViT's conv stem
    starts it, not an embedding ``Gather``)."""
    if not ctx.prune_hidden and rank >= 3 and axis == rank - 1 and ctx.has_attention:
        ctx.mark_bad(atoms, f"{_where(node)}: the hidden size (the residual stream it normalizes) prunes only with "
                            "--prune-hidden")


def rule_lrn(ctx: Context, node: onnx.NodeProto) -> None:
    """LRN (Caffe AlexNet/ZFNet): each channel is divided by a sum of squares over a window of
    neighbouring channels on axis 1. Channels pass through; removing some changes the windows of
    the others, so the group is inexact (like LayerNorm), never unprunable."""
    tr = ctx.track(node.input[0])
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    if tr.axis != 1:
        return _opaque(ctx, node, f"channels on axis {tr.axis}, not the axis it normalizes over")
    ctx.mark_inexact(tr.atoms, f"{_where(node)} normalizes over a window of neighbouring channels")
    ctx.set_track(node.output[0], 1, tr.atoms, node)


# ------------------------------------------------------------------------------------ index mapping
def rule_concat(ctx: Context, node: onnx.NodeProto) -> None:
    """Concat on the channel axis: the output carries each input's channels at its offset (untracked
    inputs and constants get unprunable placeholders). On another axis: like an elementwise op."""
    ins = [i for i in node.input if i]
    rank = ctx.rank(node.output[0])
    if rank is None:
        return _opaque(ctx, node, "unknown rank")
    axis = _norm_axis(int(attr(node, "axis")), rank)
    trs = [ctx.track(i) for i in ins]
    if all(t is None for t in trs):
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    if any(t is not None and t.axis == axis for t in trs):
        parts = []
        for i in ins:
            at = ctx.atoms_on(i, axis, node)
            if at is None:
                return _opaque(ctx, node, f"size of {i!r} on the concat axis unknown")
            parts.append(at)
        return ctx.set_track(node.output[0], axis, np.concatenate(parts), node)
    # concat along a non-channel axis: operands' channel axes must line up
    primary = next(t for t in trs if t is not None)
    atoms = primary.atoms
    for i, t in zip(ins, trs):
        if t is None:
            d = ctx.dim(i, primary.axis)
            table = runtime_table(ctx, i)
            if table is not None:
                _table_param(ctx, node, i, table, primary.axis, atoms)
            elif ctx.is_const(i) and d == len(atoms):
                ctx.add_member(i, primary.axis, atoms, "param", node)
            elif ctx.release_input(i, primary.axis, atoms, node):
                continue  # --allow-io-change: a KV cache input shrinks with the heads
            elif not (d == 1 and len(atoms) == 1):
                ctx.mark_bad(atoms, f"concatenated at {_where(node)} with {i!r}: {ctx.reason_of(i)}")
        elif t.axis != primary.axis:
            ctx.mark_bad(t.atoms, f"{_where(node)}: operands carry channels on different axes")
            ctx.mark_bad(atoms, f"{_where(node)}: operands carry channels on different axes")
        else:
            ctx.unite(atoms, t.atoms)
    ctx.set_track(node.output[0], primary.axis, atoms, node)


def split_sizes(ctx: Context, node: onnx.NodeProto, dim: int) -> list[int] | None:
    """Sizes of the outputs of a Split (input from opset 13, attribute before; equal otherwise)."""
    sizes = ctx.int_list(node, 1, "split") if ctx.opset >= 13 else (
        [int(v) for v in attr(node, "split")] if attr(node, "split") is not None else None)
    if ctx.opset >= 13 and len(node.input) > 1 and node.input[1] and sizes is None:
        return None
    return equal_split_sizes(node, dim) if sizes is None else sizes


def equal_split_sizes(node: onnx.NodeProto, dim: int) -> list[int]:
    """Split without sizes: ``ceil(dim / n)`` each, the last one takes the rest (opset 18 semantics)."""
    n = int(attr(node, "num_outputs", len(node.output)))
    per = -(-dim // n)
    return [per] * (n - 1) + [dim - per * (n - 1)]


def rule_split(ctx: Context, node: onnx.NodeProto) -> None:
    """Split on the channel axis: output ``k`` carries the channels of its window. Elsewhere: pass."""
    x = node.input[0]
    tr = ctx.track(x)
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(x)
    axis = _norm_axis(int(attr(node, "axis", 0)), rank)
    if axis != tr.axis:
        for o in node.output:
            ctx.set_track(o, tr.axis, tr.atoms, node)
        return
    sizes = split_sizes(ctx, node, len(tr.atoms))
    if sizes is None or sum(sizes) != len(tr.atoms):
        return _opaque(ctx, node, "split sizes are computed at run time")
    off = 0
    for o, s in zip(node.output, sizes):
        ctx.set_track(o, axis, tr.atoms[off:off + s], node)
        off += s


def slice_params(ctx: Context, node: onnx.NodeProto, rank: int):
    """(starts, ends, axes, steps) of a Slice (inputs from opset 10, attributes before); None if not constant."""
    if ctx.opset >= 10:
        for idx in range(1, len(node.input)):
            if node.input[idx] and ctx.const(node.input[idx]) is None:
                return None
        starts = ctx.int_list(node, 1, "__none__")
        ends = ctx.int_list(node, 2, "__none__")
        axes = ctx.int_list(node, 3, "__none__")
        steps = ctx.int_list(node, 4, "__none__")
    else:
        starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else [_norm_axis(int(a), rank) for a in axes]
    steps = [1] * len(starts) if steps is None else list(steps)
    return [int(s) for s in starts], [int(e) for e in ends], axes, [int(s) for s in steps]


def slice_window(start: int, end: int, step: int, dim: int) -> range:
    """The positions a Slice selects on one axis (ONNX clamping rules)."""
    return range(dim)[slice(start, end, step)] if step else range(0)


def _slice_axes(ctx: Context, node: onnx.NodeProto, rank: int) -> list[int] | None:
    """The axes a Slice (opset 10+) cuts when they are known although its bounds are not: the
    ``axes`` constant, or every leading axis as long as ``starts`` is."""
    if ctx.opset < 10:
        return None
    if len(node.input) > 3 and node.input[3]:
        v = ctx.const(node.input[3])
        return None if v is None else [_norm_axis(int(a), rank) for a in np.asarray(v).reshape(-1)]
    n = ctx.dim(node.input[1], 0)
    return None if n is None else list(range(n))


def rule_slice(ctx: Context, node: onnx.NodeProto) -> None:
    """Slice: on the channel axis with step 1 the output carries the window's channels (the rest of
    the producer's channels end here); other steps are unprunable. Other axes: pass-through."""
    x = node.input[0]
    tr = ctx.track(x)
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(x)
    p = slice_params(ctx, node, rank)
    if p is None:
        axes = _slice_axes(ctx, node, rank)
        if axes is not None and tr.axis not in axes:  # run-time bounds elsewhere (rotate-half's h = dh // 2)
            return ctx.set_track(node.output[0], tr.axis, tr.atoms, node)
        return _opaque(ctx, node, "slice bounds are computed at run time")
    starts, ends, axes, steps = p
    if tr.axis not in axes:
        return ctx.set_track(node.output[0], tr.axis, tr.atoms, node)
    if len(axes) > 1 and any(n in ctx.values for n in node.input[1:]):
        return _opaque(ctx, node, "run-time slice bounds on several axes")
    i = axes.index(tr.axis)
    if steps[i] != 1:
        return _opaque(ctx, node, f"slices the channel axis with step {steps[i]}")
    win = slice_window(starts[i], ends[i], 1, len(tr.atoms))
    ctx.set_track(node.output[0], tr.axis, tr.atoms[win.start:win.stop], node)


def rule_transpose(ctx: Context, node: onnx.NodeProto) -> None:
    """Transpose: the channel axis moves to where ``perm`` puts it."""
    x = node.input[0]
    tr = ctx.track(x)
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(x)
    perm = attr(node, "perm")
    perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
    ctx.set_track(node.output[0], perm.index(tr.axis), tr.atoms, node)


#: Reshapes of tensors bigger than this are not analysed element by element (unprunable instead).
MAX_RESHAPE_ELEMENTS = 1 << 24


def reshape_mapping(in_shape: tuple[int, ...], axis: int, out_shape: tuple[int, ...]):
    """How the channel axis of a row-major reshape lands in the output.

    Returns ``("map", out_axis, chan)`` when output position ``q`` on ``out_axis`` holds only channel
    ``chan[q]`` (identity, Flatten expansion ``c -> c*S..``, merges), ``("split", out_axis, chan)``
    when the channel axis is split into two adjacent output axes ``(a, b)`` (channel ``i*b + j``):
    then ``chan[j]`` lists, for minor position ``j``, the ``a`` channels ``[j, b+j, ...]`` that must
    go together; the same for three adjacent axes ``(a, b, d)`` (a fused qkv split into ``(3,
    heads, head_dim)``) as ``("split3", middle_axis, chan)``: ``chan[j]`` = every channel ``(i, j, k)``; or
    None when channels are mixed irregularly.
    """
    c = in_shape[axis]
    n = math.prod(in_shape)
    if n > MAX_RESHAPE_ELEMENTS or math.prod(out_shape) != n:
        return None
    idx = np.broadcast_to(np.arange(c).reshape([c if i == axis else 1 for i in range(len(in_shape))]), in_shape)
    out = np.ascontiguousarray(idx).reshape(out_shape)
    if c == 1:
        return None
    dependent = [u for u in range(len(out_shape)) if out_shape[u] > 1 and _depends_on(out, u)]
    if len(dependent) == 1:
        u = dependent[0]
        return ("map", u, _line(out, u))
    if len(dependent) == 2:
        u1, u2 = dependent
        a, b = out_shape[u1], out_shape[u2]
        if a * b == c and np.array_equal(_plane(out, u1, u2), np.arange(c).reshape(a, b)):
            return ("split", u2, [list(range(j, c, b)) for j in range(b)])
    if len(dependent) == 3 and dependent == list(range(dependent[0], dependent[0] + 3)):
        u1, u2, u3 = dependent
        a, b, d = out_shape[u1], out_shape[u2], out_shape[u3]
        block = out[tuple(slice(None) if i in dependent else 0 for i in range(out.ndim))]
        if a * b * d == c and np.array_equal(block, np.arange(c).reshape(a, b, d)):
            cube = np.arange(c).reshape(a, b, d)
            return ("split3", u2, [cube[:, j, :].reshape(-1).tolist() for j in range(b)])
    return None


def symbolic_reshape_mapping(in_shape: tuple | None, axis: int, out_shape: tuple | None):
    """:func:`reshape_mapping` of a reshape whose symbolic dims (batch, sequence) it leaves alone:
    the leading and trailing dims both shapes share (the same int or the same symbol) stay where
    they are, and the dims in between, static on both sides and holding the channel axis, are
    mapped as a static reshape (a head split ``[B, S, 768] -> [B, S, 12, 64]`` and its merge back).
    None when the part that changes is not static or does not hold the channel axis."""
    if in_shape is None or out_shape is None:
        return None

    def same(a, b) -> bool:
        return a is not None and a == b and (isinstance(a, int) or isinstance(a, str))

    lead = 0
    while lead < min(len(in_shape), len(out_shape)) and same(in_shape[lead], out_shape[lead]):
        lead += 1
    trail = 0
    while (trail < min(len(in_shape), len(out_shape)) - lead
           and same(in_shape[-1 - trail], out_shape[-1 - trail])):
        trail += 1
    c = in_shape[axis]
    if not isinstance(c, int):
        return None
    if axis < lead:  # the channel axis is among the shared leading dims: it stays
        return ("map", axis, np.arange(c))
    if axis >= len(in_shape) - trail:  # among the shared trailing dims
        return ("map", axis - len(in_shape) + len(out_shape), np.arange(c))
    mid_in = in_shape[lead:len(in_shape) - trail]
    mid_out = out_shape[lead:len(out_shape) - trail]
    if not mid_in or not mid_out:
        return None
    if not all(isinstance(d, int) and d >= 0 for d in (*mid_in, *mid_out)):
        return None
    m = reshape_mapping(tuple(mid_in), axis - lead, tuple(mid_out))
    return None if m is None else (m[0], m[1] + lead, m[2])


def _depends_on(arr: np.ndarray, u: int) -> bool:
    """True when values change along axis ``u``."""
    first = np.take(arr, [0], axis=u)
    return not np.array_equal(arr, np.broadcast_to(first, arr.shape))


def _constant_along(arr: np.ndarray, u: int) -> bool:
    return not _depends_on(arr, u)


def _line(arr: np.ndarray, u: int) -> np.ndarray:
    """Values along axis ``u`` (all other axes at 0); valid when nothing else varies."""
    idx = tuple(slice(None) if i == u else 0 for i in range(arr.ndim))
    line = arr[idx]
    ref = np.broadcast_to(line.reshape([-1 if i == u else 1 for i in range(arr.ndim)]), arr.shape)
    if not np.array_equal(arr, ref):
        raise ValueError("not a function of one axis")
    return line


def _plane(arr: np.ndarray, u1: int, u2: int) -> np.ndarray:
    idx = tuple(slice(None) if i in (u1, u2) else 0 for i in range(arr.ndim))
    plane = arr[idx]
    shape = [arr.shape[i] if i in (u1, u2) else 1 for i in range(arr.ndim)]
    if not np.array_equal(arr, np.broadcast_to(plane.reshape(shape), arr.shape)):
        return np.empty((0, 0))
    return plane


def rule_reshape(ctx: Context, node: onnx.NodeProto) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze, worked out element by element on the static shapes:

    - the channel axis survives or merges with untracked neighbours: output position ``q`` carries
      the channel it holds (Flatten into a Linear: channel ``c`` -> positions ``c*S .. c*S+S-1``);
    - it is split into two axes ``(a, b)`` (channel shuffle, heads): the ``a`` channels ``j, b+j,
      2b+j ...`` are united and the minor axis ``b`` carries them — exact for a following
      Transpose + Reshape shuffle, which then maps them back by the first case;
    - it is split into three axes ``(a, b, d)`` (Swin's fused ``qkv -> (3, heads, head_dim)``): the
      middle axis carries whole heads (channels ``(i, j, k)`` for every ``i, k`` go with head ``j``),
      the other two are ordinary axes afterwards (Gather of q/k/v, head_dim contracted);
    - anything else mixes channels irregularly: unprunable.
    """
    x, y = node.input[0], node.output[0]
    tr = ctx.track(x)
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    si, so = ctx.static_shape(x), ctx.static_shape(y)
    if si is None or so is None:
        m = symbolic_reshape_mapping(ctx.shape(x), tr.axis, ctx.shape(y))
        if m is None:
            return _opaque(ctx, node, "input or output shape is not static")
    else:
        m = reshape_mapping(si, tr.axis, so)
    if m is None and groupnorm_pattern(ctx, node) is not None:
        return _decomposed_groupnorm(ctx, node, tr, *groupnorm_pattern(ctx, node))
    if m is None:
        return _opaque(ctx, node, f"reshape {list(si)} -> {list(so)} mixes the channel axis with others")
    kind, u, chan = m
    if kind == "map":
        return ctx.set_track(y, u, tr.atoms[np.asarray(chan)], node)
    if kind == "split" and _leads_to_attention(ctx, y):  # heads: track the major axis, a head's channels go together
        a, b = len(chan[0]), len(chan)
        heads = [tr.atoms[i * b:(i + 1) * b] for i in range(a)]
        first = np.array([h[0] for h in heads], dtype=np.int64)
        for k in range(1, b):
            ctx.unite(first, np.array([h[k] for h in heads], dtype=np.int64))
        return ctx.set_track(y, u - 1 - _gap(ctx, y, u), first, node)
    rows = [tr.atoms[np.asarray(js)] for js in chan]  # rows[j]: the a channels that go together
    first = np.array([r[0] for r in rows], dtype=np.int64)
    for k in range(1, len(rows[0])):
        ctx.unite(first, np.array([r[k] for r in rows], dtype=np.int64))
    ctx.set_track(y, u, first, node)


def _gap(ctx: Context, y: str, u: int) -> int:
    """Size-1 axes between the major and minor axis of a split (so the major axis is ``u - 1 - gap``)."""
    shape = ctx.shape(y)
    gap = 0
    while u - 1 - gap > 0 and shape[u - 1 - gap] == 1:
        gap += 1
    return gap


#: Ops a head-split tensor passes on its way to ``Q @ K^T`` / ``attn @ V``: layout moves and unit-axis
#: views, scalings, rotary embedding (rotate-half: Slice/Neg/Concat on head_dim, times cos/sin), a KV
#: cache's Concat on the sequence axis, grouped-query attention's repeat_kv (Unsqueeze/Expand/Reshape).
_TO_ATTENTION = frozenset({"Transpose", "Mul", "Div", "Add", "Sub", "Neg", "Slice", "Concat", "Cast", "Unsqueeze",
                           "Squeeze", "Expand", "Reshape"})


def _leads_to_attention(ctx: Context, name: str, budget: int = 64) -> bool:
    """True when every path from ``name`` goes, through :data:`_TO_ATTENTION` ops only, into a MatMul
    of two activations (or a model output: a KV cache): the multi-head layout, where a split of D
    into ``(heads, head_dim)`` carries whole heads on the major axis. A path into anything else (a
    Conv after a channel shuffle, a weight MatMul) means the split is not a head split."""
    seen, stack, found = set(), [name], False
    outputs = set(ctx.view.output_names)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if len(seen) > budget:
            return False
        users = ctx.view.consumers.get(t, [])
        if not users and t not in outputs:
            return False
        for n in users:
            if n.op_type == "MatMul":
                if any(ctx.view.is_const(i) for i in n.input):
                    return False
                found = True
            elif n.op_type in ("Shape", "Size"):
                continue  # reads sizes only (rotate-half's ``x.shape[-1] // 2``)
            elif n.op_type in _TO_ATTENTION and n.domain in ("", "ai.onnx"):
                stack.extend(o for o in n.output if o)
            else:
                return False
    return found


def groupnorm_pattern(ctx, node: onnx.NodeProto):
    """GroupNorm as exporters spell it (PyTorch at every opset): ``Reshape [N,C,*] -> [N,G,-1]``,
    ``InstanceNormalization`` (per-group scale 1 / bias 0), ``Reshape`` back to ``[N,C,*]``.
    Returns ``(instance_norm_node, reshape_back_node, G)`` or None. Works on a Context or a model
    (``ctx.view``-like objects with ``consumers`` and ``shapes``)."""
    view = ctx.view
    y = node.output[0]
    users = view.consumers.get(y, [])
    if len(users) != 1 or users[0].op_type != "InstanceNormalization" or users[0].input[0] != y:
        return None
    inn = users[0]
    back = view.consumers.get(inn.output[0], [])
    if len(back) != 1 or back[0].op_type != "Reshape" or back[0].input[0] != inn.output[0]:
        return None
    si, so, sb = view.shapes.get(node.input[0]), view.shapes.get(y), view.shapes.get(back[0].output[0])
    if si is None or so is None or sb is None or tuple(sb) != tuple(si) or len(so) != 3 or len(si) < 2:
        return None
    g = so[1]
    if not isinstance(g, int) or not isinstance(si[1], int) or g < 1 or si[1] % g or so[0] != si[0]:
        return None
    return inn, back[0], g


def _decomposed_groupnorm(ctx: Context, node: onnx.NodeProto, tr, inn: onnx.NodeProto, back: onnx.NodeProto,
                          g: int) -> None:
    """The three nodes of :func:`groupnorm_pattern` act like GroupNormalization: channels keep equal
    counts in the ``G`` groups (``blocks``); statistics span each group (inexact); the output carries
    the input's channels. The InstanceNormalization scale/bias are per group and stay."""
    if tr.axis != 1:
        return _opaque(ctx, node, "group normalization over a non-channel axis")
    ctx.require_blocks(tr.atoms, g, node)
    ctx.mark_inexact(tr.atoms, f"{_where(node)} + {inn.name} normalize over groups of channels (GroupNorm)")
    ctx.skip.update({inn.name, back.name})
    ctx.set_track(back.output[0], 1, tr.atoms, back)


def rule_gather(ctx: Context, node: onnx.NodeProto) -> None:
    """Gather with constant indices: on the channel axis, output position ``q`` carries the channel at
    ``indices[q]`` (1-D indices; a scalar index pins that channel). Other axes: the channel axis moves."""
    x, ind = node.input[0], node.input[1]
    tr = ctx.track(x)
    if tr is None:
        if _embedding(ctx, node):
            return None
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(x)
    axis = _norm_axis(int(attr(node, "axis", 0)), rank)
    iv = ctx.const(ind)
    ir = ctx.rank(ind)
    if ir is None:
        return _opaque(ctx, node, "indices rank unknown")
    if axis != tr.axis:
        out_axis = tr.axis if tr.axis < axis else tr.axis - 1 + ir
        return ctx.set_track(node.output[0], out_axis, tr.atoms, node)
    if iv is None:
        return _opaque(ctx, node, "gathers channels with run-time indices")
    iv = np.asarray(iv).astype(np.int64)
    iv = np.where(iv < 0, iv + len(tr.atoms), iv)
    if iv.ndim == 0:
        ctx.mark_bad(tr.atoms[[int(iv)]], f"{_where(node)} picks this channel by index")
        return _untrack_outputs(ctx, node, f"output of {_where(node)} (one picked channel)")
    if iv.ndim != 1:
        return _opaque(ctx, node, "gathers channels with multi-dimensional indices")
    ctx.set_track(node.output[0], axis, tr.atoms[iv], node)


def _embedding(ctx: Context, node: onnx.NodeProto) -> bool:
    """Gather of rows of a constant ``[V, D]`` table by run-time ids (token or position embedding):
    the table's columns are new channels (an "out" member on its axis 1), carried on the output's
    last axis: the hidden size. It reaches every layer, so it prunes only with ``--prune-hidden``
    (else its group is unprunable, saying so). False for any other Gather."""
    x, ind = node.input[0], node.input[1]
    w = ctx.const(x)
    if w is None or w.ndim != 2 or int(attr(node, "axis", 0)) not in (0, -2) or ctx.const(ind) is not None:
        return False
    ir = ctx.rank(ind)
    if ir is None:
        return False
    out = ctx.new_atoms(int(w.shape[1]))
    ctx.add_member(x, 1, out, "out", node)
    if not ctx.prune_hidden:
        ctx.mark_bad(out, f"{_where(node)}: the hidden size (columns of embedding table {x!r}) prunes only "
                          "with --prune-hidden")
    ctx.set_track(node.output[0], ir, out, node)
    return True


def rule_expand(ctx: Context, node: onnx.NodeProto) -> None:
    """Expand: pass-through when the target shape leaves the channel axis alone (1, or the channel
    count, which the rewriter then updates)."""
    x = node.input[0]
    tr = ctx.track(x)
    if tr is None:
        return _elementwise(ctx, node, [x])
    shp = ctx.const(node.input[1])
    ri, ro = ctx.rank(x), ctx.rank(node.output[0])
    if ri is None or ro is None:
        return _opaque(ctx, node, "unknown rank")
    oax = tr.axis + ro - ri
    if shp is None:
        # a run-time target (repeat_kv's ``expand(b, kv, n, s, dh)`` between symbolic dims): fine when
        # the channel axis keeps its size; the entry itself is followed by dims.py (adapts or refused)
        if ctx.dim(node.output[0], oax) != len(tr.atoms):
            return _opaque(ctx, node, "target shape is computed at run time")
        return ctx.set_track(node.output[0], oax, tr.atoms, node)
    sax = oax - (ro - len(shp))
    if 0 <= sax < len(shp) and int(shp[sax]) not in (1, len(tr.atoms)):
        return _opaque(ctx, node, "expands the channel axis")
    ctx.set_track(node.output[0], oax, tr.atoms, node)


def rule_tile(ctx: Context, node: onnx.NodeProto) -> None:
    """Tile: the channel axis repeated ``r`` times carries channel ``c`` at ``c, C + c, 2C + c ...``."""
    x = node.input[0]
    tr = ctx.track(x)
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    reps = ctx.const(node.input[1])
    if reps is None:
        return _opaque(ctx, node, "repeats are computed at run time")
    ctx.set_track(node.output[0], tr.axis, np.tile(tr.atoms, int(reps.reshape(-1)[tr.axis])), node)


def rule_quantize(ctx: Context, node: onnx.NodeProto) -> None:
    """QuantizeLinear/DequantizeLinear (QDQ models): an activation's Q/DQ pair passes its channels.
    A per-tensor scale/zero point stays; per-channel ones along the channel axis are "param"
    members (shared by the pair: sliced once); along another axis they stay. A DequantizeLinear of
    an integer initializer is a weight (:mod:`.quantized`): its consumer's rule reads it."""
    x = node.input[0]
    if x in ctx.view.initializers or node.output[0] in ctx.qweights:
        return _untrack_outputs(ctx, node, f"output of {_where(node)} (a quantized constant)")
    tr = ctx.track(x)
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    params = [p for p in node.input[1:3] if p]
    if any(ctx.const(p) is None for p in params):
        return _opaque(ctx, node, "scale or zero point is computed at run time")
    if int(attr(node, "block_size", 0)):
        return _opaque(ctx, node, "blocked quantization of an activation")
    if ctx.const(params[0]).size > 1:
        rank = ctx.rank(x)
        if rank is None:
            return _opaque(ctx, node, "unknown rank")
        if _norm_axis(int(attr(node, "axis", 1)), rank) == tr.axis:
            for p in params:
                ctx.add_shared_param(p, tr.atoms, node)
    ctx.set_track(node.output[0], tr.axis, tr.atoms, node)


def _primary_only(rule: Rule) -> Rule:
    """Wrap a rule that follows channels through input 0 only: channels reaching any other input
    (a shape, pads, scales, indices computed from an activation) are unprunable."""
    def wrapped(ctx: Context, node: onnx.NodeProto) -> None:
        _mark_inputs_bad(ctx, node, f"{_where(node)}: channels used as an operand it does not follow",
                         inputs=[i for i in node.input[1:] if i])
        rule(ctx, node)
    wrapped.__name__, wrapped.__doc__ = rule.__name__, rule.__doc__
    return wrapped


UNARY = [
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Mish", "Gelu", "Erf", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round",
    "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "ThresholdedRelu",
    "Shrink", "Cast", "CastLike", "Identity", "Dropout", "Not", "IsNaN", "IsInf",
]
ELEMENTWISE = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater",
               "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift"]

#: op_type -> rule (default domain). Anything else: :func:`rule_unknown`.
RULES: dict[str, Rule] = {
    **{op: _primary_only(rule_passthrough) for op in UNARY},
    "CastLike": rule_passthrough,  # input 1 only lends its element type
    **{op: rule_elementwise for op in ELEMENTWISE},
    "Clip": rule_clip,
    **{op: _primary_only(rule_pool) for op in ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                                               "GlobalMaxPool", "GlobalLpPool")},
    **{op: _primary_only(rule_softmax) for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: _primary_only(rule_reduce) for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                                                 "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                                 "ReduceSumSquare")},
    "ArgMax": rule_argreduce,
    "ArgMin": rule_argreduce,
    "Pad": _primary_only(rule_pad),
    "Resize": _primary_only(rule_resize),
    "Upsample": _primary_only(rule_resize),
    "Conv": rule_conv,
    "ConvTranspose": rule_conv_transpose,
    "Gemm": rule_gemm,
    "MatMul": rule_matmul,
    "BatchNormalization": rule_batchnorm,
    "InstanceNormalization": rule_instancenorm,
    "GroupNormalization": rule_groupnorm,
    "LayerNormalization": rule_layernorm,
    "LRN": _primary_only(rule_lrn),
    "Concat": rule_concat,
    "Split": _primary_only(rule_split),
    "Slice": _primary_only(rule_slice),
    "Transpose": rule_transpose,
    "Reshape": _primary_only(rule_reshape),
    "Flatten": rule_reshape,
    "Squeeze": _primary_only(rule_reshape),
    "Unsqueeze": _primary_only(rule_reshape),
    "Gather": _primary_only(rule_gather),
    "Expand": _primary_only(rule_expand),
    "Tile": _primary_only(rule_tile),
    "Shape": rule_shape_reader,
    "Size": rule_shape_reader,
    "ConstantOfShape": rule_source,
    "Range": rule_source,
    "EyeLike": rule_shape_reader,
    "QuantizeLinear": rule_quantize,
    "DequantizeLinear": rule_quantize,
}


# ------------------------------------------------------------------------------------ ORT contrib ops
def rule_bias_activation(ctx: Context, node: onnx.NodeProto) -> None:
    """com.microsoft BiasGelu / FastGelu (``gelu(x + bias)``, bias optional) and Gelu: elementwise; a
    bias is a per-channel "param" member."""
    _elementwise(ctx, node, [i for i in node.input if i])


def rule_fused_attention(ctx: Context, node: onnx.NodeProto) -> None:
    """com.microsoft Attention (ONNX Runtime's transformer optimizer): ``x @ W + b`` with ``W``
    packed ``[hidden, q | k | v]``, split into ``num_heads`` heads, ``softmax(Q K^T) V``, heads
    concatenated. A head is ``head_dim`` columns in each third of ``W`` and ``b`` and ``head_dim``
    output channels, so a group channel is a head: "out" member on ``W``'s columns, "param" on
    ``b``, the output carries it (the rewriter updates ``num_heads``). ``x``'s channels are ``W``'s
    rows. A KV cache (``past``/``present``), an attention bias per head or unequal
    ``qkv_hidden_sizes`` fix the heads: left whole, saying which."""
    x, w = node.input[0], node.input[1]
    b = node.input[2] if len(node.input) > 2 else ""
    wv, heads = ctx.const(w), int(attr(node, "num_heads", 0))
    rank = ctx.rank(x)
    if wv is None or wv.ndim != 2 or heads <= 0 or (b and ctx.const(b) is None) or rank is None:
        return _opaque(ctx, node, "weights or bias are not constants")
    sizes = [int(v) for v in attr(node, "qkv_hidden_sizes", None) or [wv.shape[1] // 3] * 3]
    tr = ctx.track(x)
    if tr is not None:
        if tr.axis == rank - 1:
            ctx.add_member(w, 0, tr.atoms, "in", node)
        else:
            ctx.mark_bad(tr.atoms, f"{_where(node)}: channels on an axis the projection does not contract")
    if len(set(sizes)) != 1 or 3 * sizes[0] != wv.shape[1] or sizes[0] % heads:
        return _untrack_outputs(ctx, node, f"output of {_where(node)} (q, k and v of different sizes)")
    per_head = np.repeat(ctx.new_atoms(heads), sizes[0] // heads)
    columns = np.tile(per_head, 3)
    ctx.add_member(w, 1, columns, "out", node)
    if b:
        ctx.add_member(b, 0, columns, "param", node)
    fixed = [name for i, name in enumerate(node.input) if i in (4, 5) and name]  # past, attention_bias
    fixed += [o for o in node.output[1:] if o and (ctx.view.consumers.get(o) or o in ctx.view.output_names)]
    if fixed:
        ctx.mark_bad(per_head, f"{_where(node)}: {fixed[0]!r} (KV cache or attention bias) carries the heads")
    ctx.set_track(node.output[0], rank - 1, per_head, node)


def rule_skip_layernorm(ctx: Context, node: onnx.NodeProto) -> None:
    """com.microsoft SkipLayerNormalization / SkipSimplifiedLayerNormalization (what ONNX Runtime's
    transformer optimizer fuses a residual Add + LayerNorm into): ``LN(input + skip + bias)`` over
    the last axis. Input and skip channels go together, gamma/beta/bias are "param" members, the
    statistics span the channels (inexact); output 0 and the optional sum (output 3) carry them."""
    ins = [i for i in node.input[:2] if i]
    _elementwise(ctx, node, ins)
    tr = ctx.track(node.output[0])
    if tr is None:
        return _untrack_outputs(ctx, node, _untracked_inputs_reason(ctx, node))
    rank = ctx.rank(node.output[0])
    if tr.axis != rank - 1:
        return _opaque(ctx, node, "normalizes over an axis that does not hold the channels")
    for p in node.input[2:5]:
        if not p:
            continue
        if ctx.const(p) is None or ctx.const(p).shape[-1] != len(tr.atoms):
            ctx.mark_bad(tr.atoms, f"{_where(node)}: parameter {p!r} is not a per-channel constant")
            continue
        ctx.add_member(p, ctx.const(p).ndim - 1, tr.atoms, "param", node)
    ctx.mark_inexact(tr.atoms, f"{_where(node)} normalizes over the channel axis")
    _hidden_needs_opt_in(ctx, node, tr.atoms, tr.axis, rank)
    for k, o in enumerate(node.output[1:], start=1):
        if not o:
            continue
        if k == 3:
            ctx.set_track(o, tr.axis, tr.atoms, node)
        elif ctx.view.consumers.get(o):
            ctx.mark_bad(tr.atoms, f"{_where(node)}: statistics output {o!r} is used")


#: com.microsoft op_type -> rule. Fused attention (Attention, MultiHeadAttention, GroupQueryAttention)
#: and EmbedLayerNormalization have none: their channels stay whole, the reason names the op.
CONTRIB_RULES: dict[str, Rule] = {
    "BiasGelu": rule_bias_activation,
    "FastGelu": rule_bias_activation,
    "Gelu": rule_bias_activation,
    "QuickGelu": rule_bias_activation,
    "SkipLayerNormalization": rule_skip_layernorm,
    "SkipSimplifiedLayerNormalization": rule_skip_layernorm,
    "Attention": rule_fused_attention,
}


def rule_for(node: onnx.NodeProto) -> Rule:
    """The rule of ``node`` (unknown ops and other custom domains: :func:`rule_unknown`)."""
    if node.domain == "com.microsoft":
        return CONTRIB_RULES.get(node.op_type, rule_unknown)
    if node.domain not in ("", "ai.onnx"):
        return rule_unknown
    return RULES.get(node.op_type, rule_unknown)
