"""Physically remove channels: :func:`apply_plan` (analysis + kept channels -> smaller model).

Every member of a pruned group loses the positions of the removed channels along its axis:
initializers are sliced (grouped conv weights block by block), and node attributes or constant
inputs that spell out channel counts are rewritten (Conv ``group`` of depthwise convs, Reshape
targets, Split sizes, Slice bounds on the channel axis, Gather indices, Resize sizes). Activations
need nothing: their shapes follow, and are re-inferred and checked against what the analysis
expects. The result passes ``onnx.checker`` (full check), keeps input/output names and shapes and
node names.
"""
from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.errors import OnnxPruneError
from ..core.graph import attr, opset_of
from ..core.model_io import _first_line, check_model
from ..core.normalize import remove_dead, fold_constants
from ..core.shapes import infer_shapes, infer_value_shapes, skeleton, fix_input_shapes, graph_inputs, value_shapes
from .quantized import QuantizedWeight, quantized_weights
from .rules import equal_split_sizes
from .types import Analysis, KeepPlan


def validate_plan(analysis: Analysis, plan: KeepPlan) -> dict[int, np.ndarray]:
    """Check ``plan`` against ``analysis``; returns removed group channels per group id (non-empty only)."""
    groups = {g.id: g for g in analysis.groups}
    removed: dict[int, np.ndarray] = {}
    for gid, kept in plan.items():
        if gid not in groups:
            raise OnnxPruneError(f"plan names group {gid}, which the analysis does not have")
        g = groups[gid]
        k = np.asarray(kept)
        if k.ndim != 1 or (k.size and not np.issubdtype(k.dtype, np.integer)):
            raise OnnxPruneError(f"plan for group {gid}: kept channels must be a 1-D list of integers")
        k = k.astype(np.int64)
        if k.size == 0:
            raise OnnxPruneError(f"plan for group {gid} keeps no channel (at least one must stay)")
        if k.min() < 0 or k.max() >= g.size:
            raise OnnxPruneError(f"plan for group {gid}: channel indices must be in [0, {g.size}), got {k.min()}..{k.max()}")
        held = np.zeros(g.size, dtype=bool)
        held[k] = True
        if np.count_nonzero(held) != len(k):
            raise OnnxPruneError(f"plan for group {gid}: duplicate channel indices")
        if len(k) == g.size:
            continue
        if not g.prunable:
            raise OnnxPruneError(f"plan removes channels of unprunable group {gid} ({g.reason})")
        if g.blocks > 1:
            width = g.size // g.blocks
            counts = np.bincount(k // width, minlength=g.blocks)
            if len(set(counts.tolist())) != 1:
                raise OnnxPruneError(f"plan for group {gid}: its {g.blocks} blocks of {width} channels must keep "
                                     f"equal counts, got {counts.tolist()}")
        removed[gid] = np.flatnonzero(~held)  # = np.setdiff1d(np.arange(g.size), k)
    return removed


def apply_plan(model: onnx.ModelProto, analysis: Analysis, plan: KeepPlan, *, check: bool = True,
               values: Callable[[str], np.ndarray | None] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` (the normalized model the analysis was computed on, or its shape-fixed
    copy) with the channels outside ``plan`` removed. Groups absent from the plan keep everything.

    Raises :class:`OnnxPruneError` for an invalid plan (unknown group, indices out of range,
    unbalanced blocks, an empty group, removing channels of an unprunable group) or when the
    result fails shape inference or the checker. ``check=False`` skips the final full checker run
    (for searches that rewrite many times; shapes are still verified). ``values``: the model's
    initializers already decoded (``name -> array``, e.g. ``prepared.view.const``, whose model holds
    the same weights), so they are not decoded again; an array whose shape or dtype does not match
    the model's initializer is not used.
    """
    removed = validate_plan(analysis, plan)
    if not removed:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m
    groups = {g.id: g for g in analysis.groups}
    cuts: dict[tuple[str, int], list[np.ndarray]] = {}  # (tensor, axis) -> removed positions (arrays to unite)
    gcuts: dict[tuple[str, int, int], set[int]] = {}  # grouped weight members: (tensor, axis, groups)
    act: dict[str, tuple[int, set[int]]] = {}
    qweights = quantized_weights(model.graph)
    for gid, rem in removed.items():
        for mem in groups[gid].members:
            if mem.role != "act" and mem.groups <= 1:
                for tensor, axis in _sliced_tensors(mem.tensor, mem.axis, qweights):
                    cuts.setdefault((tensor, axis), []).append(mem.positions.of_channels(rem))
                continue
            pos = set(mem.positions.of_channels(rem).tolist())
            if mem.role == "act":
                ax, prev = act.setdefault(mem.tensor, (mem.axis, set()))
                if ax != mem.axis:
                    raise OnnxPruneError(f"internal: tensor {mem.tensor!r} carries channels on axes {ax} and {mem.axis}")
                prev |= pos
            else:
                tensor = qweights[mem.tensor].x if mem.tensor in qweights else mem.tensor
                gcuts.setdefault((tensor, mem.axis, mem.groups), set()).update(pos)

    for t, (ax, pos) in act.items():
        before = analysis.shapes.get(t)
        if pos and before is not None and ax < len(before) and len(pos) >= before[ax]:
            raise OnnxPruneError(f"plan removes every channel of {t!r}")
    src_inits = {i.name: i for i in model.graph.initializer}
    produced = {o for n in model.graph.node for o in n.output} | set(analysis.io)
    for t in list(act) + [k[0] for k in cuts] + [k[0] for k in gcuts]:
        if t not in src_inits and t not in produced:
            raise OnnxPruneError(f"the analysis does not match this model: it has no tensor {t!r}")
    arrays: dict[str, np.ndarray] = {}

    def arr(name: str) -> np.ndarray:
        if name not in arrays:
            t = src_inits[name]
            a = values(name) if values is not None else None
            if a is None or a.shape != tuple(t.dims) or helper.np_dtype_to_tensor_dtype(a.dtype) != t.data_type:
                a = numpy_helper.to_array(t)
            arrays[name] = a
        return arrays[name]

    for (name, axis, g), pos in gcuts.items():
        if name not in src_inits:
            raise OnnxPruneError(f"internal: grouped member {name!r} is not a constant")
        arrays[name] = _cut_grouped(arr(name), axis, g, pos)
    per_tensor: dict[str, dict[int, np.ndarray]] = {}
    for (name, axis), parts in cuts.items():
        if name not in src_inits:
            raise OnnxPruneError(f"internal: member {name!r} (axis {axis}) is not a constant")
        pos = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if pos.size:
            per_tensor.setdefault(name, {})[axis] = pos
    for name, by_axis in per_tensor.items():
        arrays[name] = _cut(arr(name), by_axis)

    # the copy: every weight that is not cut, then the cut ones written once from their arrays
    fresh: dict[str, bool] = {}  # initializers written here (True: plain raw data from an array)
    m = _copy_with_initializers(model, arrays, fresh)
    inits = {i.name: i for i in m.graph.initializer}
    arrays.clear()
    consumers: dict[str, int] = {}
    for node in m.graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
    fixer = _NodeFixer(m, analysis, act, inits, arrays, consumers)
    fixer.pin(analysis.pins)  # first: a fix of the same entry (its output lost channels) wins
    for node in list(m.graph.node):
        fixer.fix(node)
    fresh.update(dict.fromkeys(arrays, False))
    _write_arrays(m, inits, arrays)
    if fixer.replaced_inputs:
        remove_dead(m)
    del m.graph.value_info[:]  # stale: channel counts changed
    _shrink_io(m, analysis, act)
    try:
        infer_shapes(m, inplace=True, strict=True)
    except OnnxPruneError as exc:
        raise OnnxPruneError(f"pruned model fails {exc}") from exc
    _verify_shapes(m, analysis, act)
    if check:
        try:
            _check_pruned(m, fresh)
        except OnnxPruneError:
            if _passes_full_check(model):  # a model that never passed cannot be held to it
                raise
    return m


def _sliced_tensors(tensor: str, axis: int, qweights: dict[str, QuantizedWeight]) -> list[tuple[str, int]]:
    """The initializers (and axes) a member on ``tensor`` cuts: itself, or for a QDQ weight (a
    DequantizeLinear output) its integer tensor and, per channel on that axis, its scale/zero point."""
    q = qweights.get(tensor)
    if q is None:
        return [(tensor, axis)]
    return [(q.x, axis)] + [(p, 0) for p in q.params_on(axis)]


def _shrink_io(m: onnx.ModelProto, analysis: Analysis, act: dict[str, tuple[int, set[int]]]) -> None:
    """(In place.) Declared sizes of the model inputs/outputs ``--allow-io-change`` let go
    (``analysis.io``) shrink with the channels removed from them; symbolic sizes stay."""
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.name not in analysis.io or vi.name not in act:
            continue
        ax, pos = act[vi.name]
        dims = vi.type.tensor_type.shape.dim
        if pos and ax < len(dims) and dims[ax].HasField("dim_value"):
            dims[ax].dim_value -= len(pos)


def _check_pruned(m: onnx.ModelProto, fresh: dict[str, bool]) -> None:
    """``check_model(m, "pruned model", full_check=True)`` without reading back every weight.

    Initializers not in ``fresh`` are byte copies of the input model's: when one of them has a
    wrong data length the input fails the same check and the caller never raises, so only the
    written ones are length-checked; ``fresh[name]`` is True for those written straight from a
    numpy array of a plain dtype (``raw_data`` = the array's bytes, ``dims`` = its shape: consistent
    by construction)."""
    try:
        onnx.checker.check_model(skeleton(m), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise OnnxPruneError(f"pruned model: fails the ONNX checker: {_first_line(exc)}") from exc
    for t in m.graph.initializer:
        if t.name not in fresh or fresh[t.name] or t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        raw = t.raw_data
        if not raw:
            continue
        expected = math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(raw) != expected:
            raise OnnxPruneError(f"pruned model: fails the ONNX checker: initializer {t.name!r} holds {len(raw)} "
                                 f"bytes, its shape {list(t.dims)} needs {expected}")


def _cut(a: np.ndarray, by_axis: dict[int, np.ndarray]) -> np.ndarray:
    """``a`` without the given positions (repeats allowed) on each axis (as ``np.delete`` axis by
    axis, in one gather each)."""
    for axis in sorted(by_axis):
        keep = np.ones(a.shape[axis], dtype=bool)
        keep[by_axis[axis]] = False
        a = a.take(np.flatnonzero(keep), axis=axis)
    return a


#: numpy dtypes written as plain little-endian ``raw_data`` by ``numpy_helper.from_array``
_RAW_DTYPES = {np.dtype(t): helper.np_dtype_to_tensor_dtype(np.dtype(t)) for t in (
    np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.bool_)}


def _fill_tensor(t: onnx.TensorProto, name: str, a: np.ndarray) -> bool:
    """Make the empty ``t`` equal to ``numpy_helper.from_array(a, name)`` without an extra copy of the
    data; True when ``raw_data`` holds exactly the array's bytes (a plain numeric dtype)."""
    code = _RAW_DTYPES.get(a.dtype) if sys.byteorder == "little" else None
    if code is None:
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return False
    t.dims.extend(a.shape)
    t.name = name
    t.raw_data = np.ascontiguousarray(a).tobytes()
    t.data_type = code
    return True


def _copy_with_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray], fresh: dict[str, bool]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``arrays`` hold those arrays instead (same
    order); the replaced weights are never copied. Records what :func:`_fill_tensor` says in ``fresh``."""
    m = onnx.ModelProto()
    _copy_fields(m, model, skip="graph")
    _copy_fields(m.graph, model.graph, skip="initializer")
    out = m.graph.initializer
    for t in model.graph.initializer:
        if t.name in arrays:
            fresh[t.name] = _fill_tensor(out.add(), t.name, arrays[t.name])
        else:
            out.add().CopyFrom(t)
    return m


def _copy_fields(dst, src, skip: str) -> None:
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _write_arrays(m: onnx.ModelProto, inits: dict, arrays: dict) -> None:
    for name, a in arrays.items():
        t = numpy_helper.from_array(np.ascontiguousarray(a), name)
        if name in inits:
            inits[name].CopyFrom(t)
        else:
            m.graph.initializer.append(t)
            inits[name] = m.graph.initializer[-1]


def _static_copy(m: onnx.ModelProto, shapes: dict) -> onnx.ModelProto | None:
    """``m`` with its inputs fixed to the analysed static shapes and its shape computations folded."""
    try:
        fixed = {i.name: shapes[i.name] for i in graph_inputs(m)
                 if i.name in shapes and all(isinstance(d, int) for d in shapes[i.name])}
        c = fix_input_shapes(m, fixed)
        del c.graph.value_info[:]
        for _ in range(8):
            if not fold_constants(c):
                break
        return infer_shapes(c, inplace=True)
    except Exception:  # noqa: BLE001 - then run-time values are simply pinned
        return None


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        check_model(model, full_check=True)
    except OnnxPruneError:
        return False
    return True


def _cut_grouped(w: np.ndarray, axis: int, groups: int, pos: set[int]) -> np.ndarray:
    """Remove channels of a grouped weight: full-range channel ``p`` of block ``j`` is
    ``w[rows of block j (axis 0), p - j * width (axis)]``."""
    width = w.shape[axis]
    rows = w.shape[0] // groups
    blocks, kept_counts = [], set()
    for j in range(groups):
        rel = sorted(p - j * width for p in pos if j * width <= p < (j + 1) * width)
        blk = np.delete(w[j * rows:(j + 1) * rows], rel, axis=axis)
        kept_counts.add(blk.shape[axis])
        blocks.append(blk)
    if len(kept_counts) != 1:
        raise OnnxPruneError(f"grouped weight would keep unequal channel counts per group: {sorted(kept_counts)}")
    return np.concatenate(blocks, axis=0)


def _new_positions(dim: int, removed: set[int]) -> np.ndarray:
    """old position -> new position (-1 for removed ones)."""
    keep = np.ones(dim, dtype=bool)
    keep[sorted(removed)] = False
    newpos = np.full(dim, -1, dtype=np.int64)
    newpos[keep] = np.arange(int(keep.sum()))
    return newpos


class _NodeFixer:
    """Rewrites attributes and constant inputs that spell out channel counts or positions."""

    def __init__(self, m, analysis, act, inits, arrays, consumers):
        self.m, self.shapes, self.act, self.values = m, analysis.shapes, act, analysis.values
        self.adaptive, self.analysis_pins = analysis.adaptive, analysis.pins
        self.inits, self.arrays, self.consumers = inits, arrays, consumers
        self.opset = opset_of(m)
        self.replaced_inputs = False
        self._sym = None
        self._now = None
        self._version = self._now_version = 0  # set_input calls (the folded copy is redone after one)

    def now(self, name: str) -> np.ndarray | None:
        """Static value a run-time tensor takes in the pruned model (weights already sliced), or None."""
        if self._now is None or self._now_version != self._version:
            src = self.m
            if self.arrays:  # constants rewritten so far are not in the model yet: fold with them
                src = onnx.ModelProto()
                src.CopyFrom(self.m)
                _write_arrays(src, {i.name: i for i in src.graph.initializer}, self.arrays)
            c = _static_copy(src, self.shapes)
            self._now = {} if c is None else {i.name: i for i in c.graph.initializer}
            self._now_version = self._version
        t = self._now.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def cut(self, name: str, axis: int | None = None) -> set[int]:
        """Removed positions of activation ``name`` (on ``axis`` when given, else on its channel axis)."""
        if name not in self.act:
            return set()
        ax, pos = self.act[name]
        return pos if axis is None or ax == axis else set()

    def dim(self, name: str, axis: int) -> int:
        s = self.shapes.get(name)
        if s is None or axis >= len(s) or not isinstance(s[axis], int):
            raise OnnxPruneError(f"internal: static shape of {name!r} unknown to the rewriter")
        return s[axis]

    def const(self, name: str, *, model_only: bool = False) -> np.ndarray | None:
        """Value of ``name``: a constant of the model, or (unless ``model_only``) the static value
        the analysis computed for a run-time tensor."""
        if name in self.arrays:
            return self.arrays[name]
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return None if model_only else self.values.get(name)

    def set_input(self, node: onnx.NodeProto, index: int, value: np.ndarray, suffix: str) -> None:
        """Give input ``index`` of ``node`` a new constant value (in place when only it reads it)."""
        self._version += 1
        old = node.input[index] if index < len(node.input) else ""
        if old and old in self.inits and self.consumers.get(old, 0) == 1:
            self.arrays[old] = value
            return
        name = f"{node.name}_{suffix}"
        while name in self.inits or name in self.arrays:
            name += "_"
        self.arrays[name] = value
        if index < len(node.input):
            node.input[index] = name
        else:
            while len(node.input) < index:
                node.input.append("")
            node.input.append(name)
        self.replaced_inputs = True

    def pin(self, pins: dict[tuple[str, int], np.ndarray]) -> None:
        """Run-time values computed from channel counts that size tensors pruning leaves alone
        (attention internals reading the embedding width) keep their original value."""
        nodes = {n.name: n for n in self.m.graph.node}
        for (name, index), value in pins.items():
            if name in nodes and index < len(nodes[name].input):
                self.set_input(nodes[name], index, np.asarray(value), "pinned")

    def fix(self, node: onnx.NodeProto) -> None:
        if node.domain == "com.microsoft":
            fn = getattr(self, f"_fix_ms_{node.op_type}", None)
        elif node.domain in ("", "ai.onnx"):
            fn = getattr(self, f"_fix_{node.op_type}", None)
        else:
            fn = None
        if fn is not None:
            fn(node)

    def _fix_ms_Attention(self, node):
        """com.microsoft Attention: ``num_heads`` (and ``qkv_hidden_sizes``) follow the heads removed
        from its output; ``head_dim`` never changes."""
        removed = len(self.cut(node.output[0]))
        if not removed:
            return
        heads = int(attr(node, "num_heads"))
        kept_cols = self.const(node.input[1], model_only=True).shape[1] // 3
        head_dim = (kept_cols + removed) // heads
        _set_attr(node, "num_heads", kept_cols // head_dim)
        if attr(node, "qkv_hidden_sizes", None) is not None:
            _set_attr(node, "qkv_hidden_sizes", [kept_cols] * 3)

    # --------------------------------------------------------------------- per op
    def _fix_Conv(self, node):
        g = int(attr(node, "group", 1))
        x = node.input[0]
        rem = self.cut(x, 1)
        if g > 1 and rem and g == self.dim(x, 1):
            _set_attr(node, "group", g - len(rem))

    _fix_ConvTranspose = _fix_Conv

    def _fix_Reshape(self, node):
        x, y = node.input[0], node.output[0]
        if not self.cut(x) and not self.cut(y):
            return
        if y not in self.act:
            return self._fix_groupnorm_reshape(node)
        u, rem = self.act[y]
        new_u = self.dim(y, u) - len(rem)
        target = self.const(node.input[1], model_only=True)
        if target is not None:
            t = target.astype(np.int64).copy()
            allowzero = int(attr(node, "allowzero", 0))
            if t[u] == -1:
                pass
            elif t[u] == 0 and not allowzero:
                xs = self.shapes.get(x)
                in_new = None
                if xs is not None and u < len(xs) and isinstance(xs[u], int):
                    in_new = xs[u] - len(self.cut(x, u))
                if in_new != new_u:
                    t[u] = new_u
            else:
                t[u] = new_u
            if not np.array_equal(t, target):
                self.set_input(node, 1, t, "shape")
            return
        # run-time target (Shape -> Gather -> Concat ...): pin only the entry of the channel axis
        if u in self.adaptive.get(node.name, ()):
            return  # read by Shape from these very channels: adapts by itself
        if self._patch_pinned(node, u, new_u, runtime=-1):
            return
        static = self.values.get(node.input[1])
        if static is not None and int(static[u]) == -1:
            return
        now = self.now(node.input[1])
        if now is not None and int(now.reshape(-1)[u]) in (-1, new_u):
            return  # computed from the pruned shapes, or -1 (inferred: the dynamo exporter's attention
            # reshapes [B, heads, S, dh] to [-1, S, dh]): adapts by itself
        if self._patch_concat_entry(node.input[1], u, new_u, runtime=-1):
            return
        sym = self._symbolic_shapes().get(y)
        if sym is None or len(sym) != len(self.shapes[y]):
            raise OnnxPruneError(f"cannot rewrite the run-time target shape of Reshape {node.name}")
        t = [new_u if i == u else (d if isinstance(d, int) else -1) for i, d in enumerate(sym)]
        if t.count(-1) > 1:
            raise OnnxPruneError(f"cannot rewrite the run-time target shape of Reshape {node.name}: several dynamic dims")
        self.set_input(node, 1, np.array(t, dtype=np.int64), "shape")

    def _fix_groupnorm_reshape(self, node):
        """``Reshape [N,C,*] -> [N,G,X]`` of a decomposed GroupNorm: X shrinks with the channels."""
        x, y = node.input[0], node.output[0]
        users = [n for n in self.m.graph.node if y in n.input]
        if len(users) != 1 or users[0].op_type != "InstanceNormalization" or len(self.shapes.get(y, ())) != 3:
            raise OnnxPruneError(f"internal: Reshape {node.name} loses input channels but its output is not tracked")
        c = self.dim(x, 1)
        new_x = self.dim(y, 2) * (c - len(self.cut(x, 1))) // c
        target = self.const(node.input[1], model_only=True)
        if target is not None:
            t = target.astype(np.int64).copy()
            if t[2] != -1:
                t[2] = new_x
                self.set_input(node, 1, t, "shape")
            return
        static = self.values.get(node.input[1])
        now = self.now(node.input[1])
        if static is not None and int(static[2]) == -1 or now is not None and int(now.reshape(-1)[2]) in (-1, new_x):
            return
        if not self._patch_concat_entry(node.input[1], 2, new_x):
            raise OnnxPruneError(f"cannot rewrite the run-time target shape of Reshape {node.name}")

    def _patch_pinned(self, node: onnx.NodeProto, index: int, value: int, runtime: int | None = None) -> bool:
        """Set entry ``index`` of a run-time target that :meth:`pin` made (partly) constant."""
        pins = self.analysis_pins
        if (node.name, 1) in pins:
            t = self.const(node.input[1], model_only=True).astype(np.int64).copy()
            t[index] = value
            self.set_input(node, 1, t, "shape")
            return True
        producer = next((n for n in self.m.graph.node if node.input[1] in n.output), None)
        if producer is None or not any((producer.name, j) in pins for j in range(len(producer.input))):
            return False
        return self._patch_concat_entry(node.input[1], index, value, runtime)

    def _patch_concat_entry(self, name: str, index: int, value: int, runtime: int | None = None) -> bool:
        """Set entry ``index`` of a run-time 1-D shape built by a Concat of pieces to ``value`` by
        replacing the piece that holds it with a constant; False when the shape is built otherwise.

        ``runtime=-1`` (Reshape targets): a piece computed at run time becomes ``-1`` instead, when
        no other entry is ``-1``: ``nn.MultiheadAttention`` views ``[S, B, D]`` as ``[S, B * heads,
        dh]``, and the batch must stay free (``-1`` is exactly ``B * kept heads`` for every ``B``).
        A constant ``-1`` already at ``index`` stays: it adapts by itself, and the dynamo exporter
        shares one target between Reshapes that keep different head counts (q and k of
        grouped-query attention, both ``[B, S, -1, dh]``)."""
        producer = next((n for n in self.m.graph.node if name in n.output), None)
        if producer is None or producer.op_type != "Concat":
            return False
        reshape_target = runtime is not None
        if runtime is not None:
            whole = self.values.get(name)
            consts = [self.const(p, model_only=True) for p in producer.input]
            if (whole is not None and (np.asarray(whole) == runtime).sum() > 0) or any(
                    c is not None and (np.asarray(c) == runtime).any() for c in consts):
                runtime = None
        sym = None
        off = 0
        for idx, piece in enumerate(producer.input):
            const = self.const(piece, model_only=True)
            if const is not None:
                length = int(const.size)
            else:
                sym = sym if sym is not None else self._symbolic_shapes()
                s = sym.get(piece)
                if s is None or len(s) != 1 or not isinstance(s[0], int):
                    return False
                length = s[0]
            if off <= index < off + length:
                if const is not None and reshape_target and int(const.reshape(-1)[index - off]) == -1:
                    return True
                if const is not None:
                    new = const.astype(np.int64).reshape(-1).copy()
                    new[index - off] = value
                elif length == 1:
                    new = np.array([value if runtime is None else runtime], dtype=np.int64)
                else:
                    return False
                self.set_input(producer, idx, new, "dim")
                return True
            off += length
        return False

    def _symbolic_shapes(self):
        if self._sym is None:
            try:
                self._sym = infer_value_shapes(self.m)
            except Exception:  # noqa: BLE001 - then every run-time target is an error above
                self._sym = {}
        return self._sym

    def _cut_on_axis_attr(self, node) -> tuple[str, int, set[int]]:
        """Input, its ``axis`` attribute (normalized) and the positions removed on that axis."""
        x = node.input[0]
        rank = len(self.shapes.get(x, ()))
        axis = int(attr(node, "axis", 0))
        axis = axis + rank if axis < 0 else axis
        return x, axis, self.cut(x, axis)

    def _fix_Split(self, node):
        x, axis, rem = self._cut_on_axis_attr(node)
        if not rem:
            return
        dim = self.dim(x, axis)
        if self.opset >= 13 and len(node.input) > 1 and node.input[1]:
            sizes = [int(v) for v in self.const(node.input[1]).reshape(-1)]
        elif self.opset < 13 and attr(node, "split") is not None:
            sizes = [int(v) for v in attr(node, "split")]
        else:
            sizes = equal_split_sizes(node, dim)
        new, off = [], 0
        for s in sizes:
            new.append(s - sum(1 for p in rem if off <= p < off + s))
            off += s
        if any(s <= 0 for s in new):
            raise OnnxPruneError(f"plan empties an output of Split {node.name}")
        if self.opset >= 13:
            _del_attr(node, "num_outputs")
            self.set_input(node, 1, np.array(new, dtype=np.int64), "split")
        else:
            _set_attr(node, "split", new)

    def _fix_Slice(self, node):
        x = node.input[0]
        if x not in self.act:
            return
        ax, rem = self.act[x]
        if not rem:
            return
        rank = len(self.shapes[x])
        dim = self.dim(x, ax)
        def newpos_count(b: int) -> int:  # kept positions before b
            return b - sum(1 for p in rem if p < b)
        if self.opset >= 10 and (self.const(node.input[1]) is None or self.const(node.input[2]) is None):
            axes_v = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes_v is not None and ax not in [int(a) + rank if a < 0 else int(a) for a in axes_v.reshape(-1)]:
                return  # run-time bounds on another axis (the analysis checked the same)
            raise OnnxPruneError(f"cannot rewrite the run-time bounds of Slice {node.name}")
        if self.opset >= 10:
            starts = [int(v) for v in self.const(node.input[1]).reshape(-1)]
            ends = [int(v) for v in self.const(node.input[2]).reshape(-1)]
            axes = ([int(v) for v in self.const(node.input[3]).reshape(-1)] if len(node.input) > 3 and node.input[3]
                    else list(range(len(starts))))
        else:
            starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
            axes = list(attr(node, "axes", list(range(len(starts)))))
        axes = [a + rank if a < 0 else a for a in axes]
        if ax not in axes:
            return
        i = axes.index(ax)
        win = range(dim)[slice(starts[i], ends[i], 1)]
        starts[i], ends[i] = newpos_count(win.start), newpos_count(win.stop)
        if self.opset >= 10:
            self.set_input(node, 1, np.array(starts, dtype=self.const(node.input[1]).dtype), "starts")
            self.set_input(node, 2, np.array(ends, dtype=self.const(node.input[2]).dtype), "ends")
        else:
            _set_attr(node, "starts", starts)
            _set_attr(node, "ends", ends)

    def _fix_Gather(self, node):
        y = node.output[0]
        x, axis, rem = self._cut_on_axis_attr(node)
        if not rem:
            return
        idx = self.const(node.input[1]).astype(np.int64)
        dim = self.dim(x, axis)
        idx = np.where(idx < 0, idx + dim, idx)
        newpos = _new_positions(dim, rem)
        if idx.ndim == 1:
            out_rem = self.cut(y, axis)
            keep = np.ones(len(idx), dtype=bool)
            keep[sorted(out_rem)] = False
            idx = idx[keep]
        new = newpos[idx]
        if (new < 0).any():
            raise OnnxPruneError(f"internal: Gather {node.name} would read a removed channel")
        self.set_input(node, 1, new.astype(self.const(node.input[1]).dtype), "indices")

    def _fix_Expand(self, node):
        y = node.output[0]
        if y not in self.act or not self.act[y][1]:
            return
        u, rem = self.act[y]
        shp_name = node.input[1]
        shp = self.const(shp_name)
        if shp is None:
            n = self.shapes.get(shp_name)
            if n is not None and len(n) == 1 and isinstance(n[0], int) and \
                    u - (len(self.shapes[y]) - n[0]) in self.adaptive.get(node.name, ()):
                return  # a run-time target reading these very channels: adapts by itself
            raise OnnxPruneError(f"cannot rewrite the target shape of Expand {node.name}")
        i = u - (len(self.shapes[y]) - len(shp))
        if i < 0 or int(shp[i]) == 1 or i in self.adaptive.get(node.name, ()):
            return  # broadcast, or read by Shape from these very channels: adapts by itself
        want = int(shp[i]) - len(rem)
        if self.const(shp_name, model_only=True) is not None:
            new = shp.astype(np.int64).copy()
            new[i] = want
            self.set_input(node, 1, new, "shape")
            return
        if self._patch_pinned(node, i, want):
            return
        now = self.now(shp_name)
        if now is not None and int(now.reshape(-1)[i]) in (1, want):
            return
        if not self._patch_concat_entry(shp_name, i, want):
            raise OnnxPruneError(f"cannot rewrite the run-time target shape of Expand {node.name}")

    def _fix_Resize(self, node):
        x = node.input[0]
        if x not in self.act or len(node.input) < 4 or not node.input[3]:
            return
        ax, rem = self.act[x]
        if not rem:
            return
        rank = len(self.shapes[x])
        axes = attr(node, "axes")
        axes = list(range(rank)) if axes is None else [int(a) + rank if a < 0 else int(a) for a in axes]
        if ax not in axes:
            return
        i = axes.index(ax)
        model_sizes = self.const(node.input[3], model_only=True)
        if model_sizes is not None:
            sizes = model_sizes.astype(np.int64).copy()
            sizes[i] -= len(rem)
            self.set_input(node, 3, sizes, "sizes")
            return
        # run-time sizes (size=f.shape[-2:]): often read from the input's own shape and adapt; else
        # pin only the channel entry, keeping the rest dynamic
        static = self.values.get(node.input[3])
        want = None if static is None else int(static[i]) - len(rem)
        now = self.now(node.input[3])
        if want is not None and now is not None and int(now.reshape(-1)[i]) == want:
            return
        if want is None or not self._patch_concat_entry(node.input[3], i, want):
            raise OnnxPruneError(f"cannot rewrite the run-time sizes of Resize {node.name}")


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    _del_attr(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _del_attr(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    if len(keep) != len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(keep)


def _verify_shapes(m: onnx.ModelProto, analysis: Analysis, act: dict[str, tuple[int, set[int]]]) -> None:
    """Every activation that lost channels must have exactly the expected count after inference."""
    shapes = value_shapes(m)
    unknown = [n for n, (axis, rem) in act.items() if rem and n in analysis.shapes and not (
        n in shapes and axis < len(shapes[n]) and isinstance(shapes[n][axis], int))]
    if unknown and any(n.op_type in ("Shape", "Size") for n in m.graph.node):
        static = _static_copy(m, analysis.shapes)  # run-time shapes: check them at the analysed input shapes
        if static is not None:
            shapes = {**value_shapes(static), **{k: v for k, v in shapes.items() if k not in unknown}}
    for name, (axis, rem) in act.items():
        if not rem:
            continue
        before = analysis.shapes.get(name)
        after = shapes.get(name)
        if before is None or after is None or axis >= len(after) or not isinstance(after[axis], int):
            continue
        if after[axis] != before[axis] - len(rem):
            raise OnnxPruneError(f"internal: after pruning {name!r} has {after[axis]} positions on axis {axis}, "
                                 f"expected {before[axis] - len(rem)}")
