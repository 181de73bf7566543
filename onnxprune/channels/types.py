"""Data types of the channel-dependency analysis (the contract between analysis, importance,
allocation and rewriting).

A *group* is a set of channels that must be removed together: removing group channel ``k`` removes,
on every member tensor, the positions ``member.positions[k]`` along ``member.axis``. Positions are
an index mapping, so Concat offsets, Flatten expansion (channel -> C*H*W block), channel shuffle
permutations and Split/Slice windows are all expressed the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import numpy as np

#: What a member is, which decides how importance reads it and how the rewriter slices it.
#: - "out":   a weight whose slices along ``axis`` produce the channels (Conv/Gemm/MatMul weight rows)
#: - "in":    a weight whose slices along ``axis`` consume the channels (next layer's input dim)
#: - "param": a per-channel vector/tensor sliced with the channels (bias, BN/LN/PRelu params, SE scale)
#: - "act":   an activation tensor carrying the channels (nothing to slice; shapes are re-inferred)
Role = Literal["out", "in", "param", "act"]


class Positions(Sequence):
    """``positions[k]``: the positions (a tuple of ints) of group channel ``k`` on a member's axis.

    Behaves as the tuple of tuples it stands for (indexing, iteration, ``len``, equality with plain
    tuples, hashing), but is stored as two int64 arrays so analyses of big models never build
    hundreds of thousands of small tuples: ``flat`` (every position, channel by channel) and
    ``offsets`` (channel ``k`` owns ``flat[offsets[k]:offsets[k + 1]]``)."""

    __slots__ = ("flat", "offsets", "_counts", "_grid", "_tuple", "_hash")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = np.asarray(flat, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.flat.flags.writeable = False
        self.offsets.flags.writeable = False
        self._counts = None
        self._grid = False  # not computed yet (None: no grid)
        self._tuple = None
        self._hash = None

    @classmethod
    def of(cls, value) -> "Positions":
        """From a Positions (returned as is) or any sequence of sequences of ints."""
        if isinstance(value, Positions):
            return value
        seqs = [tuple(int(p) for p in v) for v in value]
        counts = np.fromiter((len(v) for v in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter((p for v in seqs for p in v), dtype=np.int64, count=int(counts.sum()))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(flat, offsets)

    @classmethod
    def from_counts(cls, flat: np.ndarray, counts: np.ndarray) -> "Positions":
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(flat, offsets)

    @property
    def counts(self) -> np.ndarray:
        """Number of positions of each group channel."""
        if self._counts is None:
            self._counts = np.diff(self.offsets)
            self._counts.flags.writeable = False
        return self._counts

    @property
    def owner(self) -> np.ndarray:
        """The group channel of each entry of :attr:`flat`."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.counts)

    @property
    def all_held(self) -> bool:
        """True when every group channel has at least one position (``all(positions)``)."""
        return bool((self.counts > 0).all())

    def held(self) -> np.ndarray:
        """Mask of the group channels with at least one position."""
        return self.counts > 0

    def grid(self) -> np.ndarray | None:
        """``flat`` as a [channels, n] array when every channel has the same number ``n`` >= 1, else None."""
        if self._grid is False:
            c = self.counts
            self._grid = None if not len(c) or c[0] == 0 or not (c == c[0]).all() else self.flat.reshape(len(c), int(c[0]))
        return self._grid

    def of_channels(self, channels) -> np.ndarray:
        """Every position of the given group channels (concatenated, in the order given)."""
        ch = np.asarray(channels, dtype=np.int64).reshape(-1)
        if not ch.size:
            return np.zeros(0, dtype=np.int64)
        g = self.grid()
        if g is not None:
            return g[ch].reshape(-1)
        starts, counts = self.offsets[ch], self.counts[ch]
        total = int(counts.sum())
        if not total:
            return np.zeros(0, dtype=np.int64)
        idx = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(total)
        return self.flat[idx]

    def _as_tuple(self) -> tuple[tuple[int, ...], ...]:
        if self._tuple is None:
            flat, off = self.flat.tolist(), self.offsets.tolist()
            self._tuple = tuple(tuple(flat[off[k]:off[k + 1]]) for k in range(len(off) - 1))
        return self._tuple

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self._as_tuple()[k]
        n = len(self)
        k = int(k)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError("group channel index out of range")
        return tuple(self.flat[self.offsets[k]:self.offsets[k + 1]].tolist())

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self._as_tuple())

    def __bool__(self) -> bool:
        return len(self) > 0

    def __eq__(self, other) -> bool:
        if isinstance(other, Positions):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.flat, other.flat)
        if isinstance(other, tuple):
            return self._as_tuple() == other
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self._as_tuple())
        return self._hash

    def __repr__(self) -> str:
        return repr(self._as_tuple())


@dataclass(frozen=True)
class Member:
    """One place where a group's channels live."""

    tensor: str  # initializer or activation name
    axis: int  # axis of ``tensor`` holding the channels
    positions: Positions  # positions[k]: indices on ``axis`` for group channel k (a tuple of ints); any
    # sequence of sequences given is stored as :class:`Positions`
    role: Role
    node: str  # name of the node that reads/produces this member (for reports and --ignore)
    #: > 1 only for the weight of a general grouped Conv ("in", axis 1) or ConvTranspose ("out", axis 1):
    #: positions then index the op's full channel range (0..C-1), and the channels of block ``j``
    #: (``C / groups`` consecutive ones) live at ``tensor[rows of block j of axis 0, p - j * C / groups]``.
    #: Read such members with :mod:`onnxprune.channels.slices`.
    groups: int = 1

    def __post_init__(self):
        if not isinstance(self.positions, Positions):
            object.__setattr__(self, "positions", Positions.of(self.positions))


@dataclass
class Group:
    """Channels that must go together, with everything that has to be sliced."""

    id: int
    size: int  # number of group channels
    members: list[Member] = field(default_factory=list)
    prunable: bool = True
    reason: str | None = None  # why not prunable (unknown op, graph output, dynamic shape ...)
    blocks: int = 1  # channels form ``blocks`` equal contiguous blocks that must stay equal (grouped conv, GroupNorm)
    nodes: list[str] = field(default_factory=list)  # node names touched (for --ignore and reports)
    #: False when removing channels changes the outputs even if they contribute nothing downstream
    #: (statistics over the channel axis: LayerNormalization/GroupNormalization); still prunable.
    exact: bool = True
    inexact_reason: str | None = None
    #: sets of group channels of which at least one must stay, because together they are all a
    #: tensor holds (a Split/Slice piece, one branch's part of a Concat); keeping every set non-empty
    #: keeps every tensor non-empty
    keep_one_of: list[tuple[int, ...]] = field(default_factory=list)

    def members_with_role(self, role: Role) -> list[Member]:
        return [m for m in self.members if m.role == role]


@dataclass
class Analysis:
    """Result of the dependency analysis of one normalized model."""

    groups: list[Group]
    #: shapes (from the analysed view) of the tensors the rewriter needs to know: static dims as
    #: ints, symbolic ones (a batch or sequence the inputs leave open) as their names
    shapes: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    #: static values of tensors computed at run time in the model (shape computations feeding Reshape
    #: targets, Slice bounds, Split sizes) that the analysis relied on; the rewriter pins them
    values: dict[str, np.ndarray] = field(default_factory=dict)
    #: node name -> entries of its run-time Reshape/Expand target that are the channel count of the
    #: output's own channels, read at run time by Shape: they adapt by themselves (never rewritten)
    adaptive: dict[str, set[int]] = field(default_factory=dict)
    #: (node name, input index) -> the constant that input gets when channels are removed: a
    #: run-time value computed from channel counts that sizes a tensor pruning leaves alone
    pins: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    #: ``allow_io_change`` only: model inputs/outputs (name -> channel axis) whose declared size
    #: the rewriter shrinks with their channels (KV-cache inputs and outputs)
    io: dict[str, int] = field(default_factory=dict)

    def group(self, gid: int) -> Group:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def unprunable(self) -> list[Group]:
        return [g for g in self.groups if not g.prunable]


#: Kept channels per group id (sorted group-channel indices); what allocation hands the rewriter.
KeepPlan = dict[int, np.ndarray]
