"""The propagation state the per-op rules in :mod:`onnxprune.channels.rules` work on.

Vocabulary:

- an **atom** is one channel as first created by a producer (output channel ``k`` of a Conv/Gemm/
  MatMul) or, for a tensor whose channels come from outside the analysis (a model input, the output
  of an unsupported op), a placeholder that is marked *bad* at once;
- every activation tensor the analysis follows has a **track**: the axis holding its channels and,
  for every position on that axis, the atom it carries (several positions may carry the same atom:
  Flatten expands channel ``c`` into ``c*S .. c*S+S-1``);
- rules **unite** atoms that must be removed together (both operands of a residual Add), which is a
  union-find over atoms; a **group channel** is a class of united atoms, a **group** is every class
  reachable from one another through the producers that created them;
- rules record **members** (tensor, axis, atom per position, role) — what the rewriter slices — and
  **bad** / **inexact** marks with a human reason; one bad atom makes its whole group unprunable.

A tensor without a track is either harmless (a shape computation, attention scores) or opaque; its
``untracked_reason`` says which, and a rule that must couple tracked channels with an opaque tensor
marks them bad with that reason. Never prune on a guess.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..core.graph import GraphView, opset_of, attr
from .quantized import QuantizedWeight, dequantized_value, quantized_weights
from .types import Role


@dataclass
class Track:
    """Where an activation tensor's channels are: ``axis`` and one atom id per position on it."""

    axis: int
    atoms: np.ndarray  # int64, length = dim on axis


@dataclass
class RawMember:
    tensor: str
    axis: int
    atoms: np.ndarray  # one atom per position on ``axis`` (-1: position belongs to no group)
    role: Role
    node: str
    groups: int = 1


def _find_root(parent: list[int], a: int) -> int:
    """Union-find root of ``a``, compressing the path on the way (iterative: chains can be long)."""
    root = a
    while parent[root] != root:
        root = parent[root]
    while parent[a] != root:
        parent[a], a = root, parent[a]
    return root


#: ONNX Runtime's fused attention ops (com.microsoft)
FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                             "PackedMultiHeadAttention"})


class Context:
    """Mutable state of one propagation over a :class:`~onnxprune.core.graph.GraphView`."""

    def __init__(self, view: GraphView, original: GraphView | None = None, *, allow_io_change: bool = False,
                 prune_hidden: bool = False):
        self.view = view  # shape computations folded where shapes are static (see analyze._static_view)
        self.original = original or view  # what the rewriter will see: run-time values it must be told
        self.values: dict[str, np.ndarray] = {}  # static values of run-time tensors the rules relied on
        self.opset = opset_of(view.model)
        self._parent: list[int] = []  # union-find over atoms
        self._source: list[int] = []  # atom -> source id (one per new_atoms call)
        self._src_parent: list[int] = []  # union-find over sources
        self.source_atoms: list[tuple[int, int]] = []  # source -> (first atom, count)
        self.bad: list[tuple[int, str]] = []
        self.inexact: list[tuple[int, str]] = []
        self.tracks: dict[str, Track] = {}
        self.untracked_reason: dict[str, str] = {}
        self.members: list[RawMember] = []
        self.constraints: list[tuple[np.ndarray, int, str]] = []  # (atoms by position, blocks, node)
        self.skip: set[str] = set()  # nodes a rule already handled as part of a pattern
        #: node -> entries of its run-time Reshape/Expand target that count the channels of its
        #: output (read by Shape from the same channels): they adapt by themselves (see dims.py)
        self.adaptive: dict[str, set[int]] = {}
        #: (node, input index) -> constant the rewriter puts there: a run-time value computed from
        #: channel counts that sizes a tensor pruning leaves alone keeps its original value
        self.pins: dict[tuple[str, int], np.ndarray] = {}
        #: QDQ weights: DequantizeLinear outputs of integer initializers, read as the float constants
        #: they stand for; members on them are sliced in the integer tensor (and its per-channel scale)
        self.qweights: dict[str, QuantizedWeight] = quantized_weights(view.model.graph)
        self._qvalues: dict[str, np.ndarray] = {}
        self._const_users: dict[str, set[str]] = {}
        for name, users in view.consumers.items():
            if name in view.initializers or name in self.qweights:
                self._const_users[name] = {n.name for n in users}
        for name in view.input_names:
            self.untracked_reason[name] = f"reaches model input {name!r}"
        #: ``--allow-io-change``: model inputs concatenated with tracked channels (a KV cache) take
        #: them (:meth:`release_input`), and outputs carrying only such channels may shrink too
        self.allow_io_change = allow_io_change
        self.io_inputs: dict[str, np.ndarray] = {}
        #: ``--prune-hidden``: embedding tables' columns (the residual stream) may be pruned
        self.prune_hidden = prune_hidden
        self._attention: bool | None = None

    @property
    def has_attention(self) -> bool:
        """True when some MatMul multiplies two activations of rank >= 3 (``Q @ K^T``), or an ONNX
        Runtime attention op is there: a transformer, whose normalized hidden size is its residual
        stream."""
        if self._attention is None:
            self._attention = any(
                (n.domain == "com.microsoft" and n.op_type in FUSED_ATTENTION)
                or n.op_type == "MatMul" and len(n.input) == 2
                and not any(self.view.is_const(i) or i in self.qweights for i in n.input)
                and all(len(self.view.shapes.get(i) or ()) >= 3 for i in n.input)
                for n in self.view.model.graph.node)
        return self._attention

    # ----------------------------------------------------------------- atoms
    def new_atoms(self, n: int) -> np.ndarray:
        """``n`` fresh atoms forming one new source (a producer's output channels)."""
        start = len(self._parent)
        src = len(self._src_parent)
        self._src_parent.append(src)
        self.source_atoms.append((start, n))
        self._parent.extend(range(start, start + n))
        self._source.extend([src] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def bad_atoms(self, n: int, reason: str) -> np.ndarray:
        """``n`` fresh atoms already marked unprunable (channels from outside the analysis)."""
        atoms = self.new_atoms(n)
        if n:
            self.bad.append((int(atoms[0]), reason))
        return atoms

    def find(self, a: int) -> int:
        return _find_root(self._parent, a)

    def find_source(self, s: int) -> int:
        return _find_root(self._src_parent, s)

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        """Atoms ``a[i]`` and ``b[i]`` must be removed together (arrays of equal length)."""
        if len(a) != len(b):
            raise ValueError(f"cannot unite {len(a)} with {len(b)} channels")
        parent, source, find = self._parent, self._source, self.find
        united: set[tuple[int, int]] = set()  # source pairs already united by this call (unions only merge)
        for x, y in zip(a.tolist(), b.tolist()):
            rx = x if parent[x] == x else find(x)
            ry = y if parent[y] == y else find(y)
            if rx != ry:
                if ry < rx:
                    rx, ry = ry, rx
                parent[ry] = rx
                pair = (source[rx], source[ry])
                if pair in united:
                    continue
                united.add(pair)
                sx, sy = self.find_source(pair[0]), self.find_source(pair[1])
                if sx != sy:
                    if sy < sx:
                        sx, sy = sy, sx
                    self._src_parent[sy] = sx

    def mark_bad(self, atoms: np.ndarray | None, reason: str) -> None:
        """The groups of ``atoms`` are unprunable because of ``reason``."""
        if atoms is not None and len(atoms):
            self.bad.append((int(atoms[0]), reason))
            # every atom of the array must be bad, even if they end up in different groups
            for a in atoms[1:].tolist():
                self.bad.append((int(a), reason))

    def mark_inexact(self, atoms: np.ndarray | None, reason: str) -> None:
        if atoms is not None and len(atoms):
            for a in atoms.tolist():
                self.inexact.append((int(a), reason))

    def require_blocks(self, atoms: np.ndarray, blocks: int, node: onnx.NodeProto) -> None:
        """Positions of ``atoms`` form ``blocks`` contiguous blocks that must keep equal channel counts."""
        self.constraints.append((np.asarray(atoms, dtype=np.int64), int(blocks), node.name))

    # ----------------------------------------------------------------- tracks
    def track(self, name: str) -> Track | None:
        return self.tracks.get(name)

    def set_track(self, name: str, axis: int, atoms: np.ndarray, node: onnx.NodeProto) -> None:
        """``name`` (an output of ``node``) carries ``atoms`` on ``axis``; records it as an "act" member."""
        if not name:
            return
        atoms = np.asarray(atoms, dtype=np.int64)
        dim = self.dim(name, axis)
        if dim is not None and dim != len(atoms):
            raise AssertionError(f"internal: {node.name} {name!r} axis {axis} has {dim} positions, rule gave {len(atoms)}")
        self.tracks[name] = Track(axis, atoms)
        self.members.append(RawMember(name, axis, atoms, "act", node.name))

    def untrack(self, name: str, reason: str) -> None:
        if name:
            self.untracked_reason[name] = reason

    def reason_of(self, name: str) -> str:
        return self.untracked_reason.get(name) or f"channels of {name!r} are not tracked"

    def atoms_on(self, name: str, axis: int, node: onnx.NodeProto, *, need: bool = True) -> np.ndarray | None:
        """The atoms ``name`` carries on ``axis``.

        A tensor tracked on another axis has its channels marked bad (``node`` would mix them with a
        non-channel axis). An untracked tensor gets fresh bad atoms when ``need`` (so that whatever
        it is coupled with becomes unprunable), else None. None too when the dim is unknown.
        """
        tr = self.tracks.get(name)
        if tr is not None and tr.axis == axis:
            return tr.atoms
        if tr is not None:
            self.mark_bad(tr.atoms, f"node {node.name} ({node.op_type}) reads {name!r} with channels on axis {axis}, "
                                    f"but they are on axis {tr.axis}")
            reason = f"coupled at node {node.name} ({node.op_type}) with a non-channel axis of {name!r}"
        else:
            reason = self.reason_of(name)
            if name in self.view.initializers:
                reason = f"constant {name!r} concatenated or coupled at node {node.name} ({node.op_type})"
        if not need:
            return None
        d = self.dim(name, axis)
        if d is None:
            return None
        return self.bad_atoms(d, reason)

    def release_input(self, name: str, axis: int, atoms: np.ndarray, node: onnx.NodeProto) -> bool:
        """With ``allow_io_change``: model input ``name`` carries ``atoms`` on ``axis`` (it is
        concatenated with them, as a KV cache with the new keys), so its declared size there shrinks
        with them instead of fixing them. False (nothing recorded) otherwise."""
        if not self.allow_io_change or name not in self.view.input_names or self.dim(name, axis) != len(atoms):
            return False
        prev = self.io_inputs.get(name)
        if prev is not None:
            if len(prev) != len(atoms) or self.tracks.get(name) is None or self.tracks[name].axis != axis:
                return False
            self.unite(prev, atoms)
            return True
        self.io_inputs[name] = np.asarray(atoms, dtype=np.int64)
        self.tracks[name] = Track(axis, self.io_inputs[name])
        self.members.append(RawMember(name, axis, self.io_inputs[name], "act", node.name))
        return True

    # ----------------------------------------------------------------- members
    def add_member(self, tensor: str, axis: int, atoms: np.ndarray, role: Role, node: onnx.NodeProto,
                   groups: int = 1) -> None:
        """A weight/parameter sliced with the channels. Constants shared by several nodes cannot be
        sliced for one of them only: their channels are marked bad."""
        atoms = np.asarray(atoms, dtype=np.int64)
        q = self.qweights.get(tensor)
        for t in [tensor] + ([q.x] + q.params_on(axis) if q else []):
            users = self._const_users.get(t, set())
            if len(users) > 1:
                self.mark_bad(atoms[atoms >= 0], f"constant {t!r} is shared by nodes {', '.join(sorted(users))}")
        if q is not None and groups > 1 and q.params_on(axis):
            self.mark_bad(atoms[atoms >= 0], f"constant {tensor!r}: per-channel scales of a grouped weight's "
                                             "second axis are not sliced")
        if tensor in set(self.view.output_names):
            self.mark_bad(atoms[atoms >= 0], f"constant {tensor!r} is a model output")
        self.members.append(RawMember(tensor, axis, atoms, role, node.name, groups))

    def add_shared_param(self, tensor: str, atoms: np.ndarray, node: onnx.NodeProto) -> None:
        """A 1-D per-channel constant that several nodes read for the *same* channels (the scale
        of a QuantizeLinear/DequantizeLinear pair): recorded once; a later reader's channels are
        united with the first's (they are cut together). Readers that are not Q/DQ nodes: bad."""
        atoms = np.asarray(atoms, dtype=np.int64)
        users = {n.op_type for n in self.view.consumers.get(tensor, [])}
        if not users <= {"QuantizeLinear", "DequantizeLinear"}:
            return self.mark_bad(atoms, f"constant {tensor!r} is shared by nodes other than QuantizeLinear/"
                                        f"DequantizeLinear ({', '.join(sorted(users))})")
        prev = next((m for m in self.members if m.tensor == tensor and m.role == "param"), None)
        if prev is None:
            self.members.append(RawMember(tensor, 0, atoms, "param", node.name))
        elif len(prev.atoms) == len(atoms):
            self.unite(prev.atoms, atoms)
        else:
            self.mark_bad(atoms, f"constant {tensor!r} is read for {len(prev.atoms)} and {len(atoms)} channels")

    # ----------------------------------------------------------------- lookups
    def const(self, name: str) -> np.ndarray | None:
        """Constant value of ``name``; a run-time value in the original graph that is static here
        (a shape computation) is recorded in :attr:`values` so the rewriter can pin it."""
        if not name:
            return None
        q = self.qweights.get(name)
        if q is not None:
            if name not in self._qvalues:
                self._qvalues[name] = dequantized_value(q, self.view.const)
            return self._qvalues[name]
        v = self.view.const(name)
        if v is not None and not self.original.is_const(name):
            self.values[name] = v
        return v

    def int_list(self, node: onnx.NodeProto, index: int, attr_name: str) -> list[int] | None:
        """Int list given as input ``index`` (newer opsets) or attribute ``attr_name`` (older)."""
        if len(node.input) > index and node.input[index]:
            v = self.const(node.input[index])
            return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
        val = attr(node, attr_name)
        return None if val is None else [int(x) for x in val]

    def is_const(self, name: str) -> bool:
        return bool(name) and (self.view.is_const(name) or name in self.qweights)

    def shape(self, name: str) -> tuple | None:
        if not name:
            return None
        s = self.view.shape(name)
        if s is None and name in self.view.initializers:
            s = tuple(int(d) for d in self.view.initializers[name].dims)
        return s

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def dim(self, name: str, axis: int) -> int | None:
        """Static size of ``name`` on ``axis`` (None when unknown or symbolic)."""
        s = self.shape(name)
        if s is None or not -len(s) <= axis < len(s):
            return None
        d = s[axis]
        return d if isinstance(d, int) and d >= 0 else None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        s = self.shape(name)
        if s is None or not all(isinstance(d, int) and d >= 0 for d in s):
            return None
        return tuple(int(d) for d in s)
