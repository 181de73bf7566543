"""Data types of the channel-dependency analysis (the contract between analysis, importance,
allocation and rewriting).

A *group* is a set of channels that must be removed together: removing group channel ``k`` removes,
on every member tensor, the positions ``member.positions[k]`` along ``member.axis``. Positions are
an index mapping, so Concat offsets, Flatten expansion (channel -> C*H*W block), channel shuffle
permutations and Split/Slice windows are all expressed the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

#: What a member is, which decides how importance reads it and how the rewriter slices it.
#: - "out":   a weight whose slices along ``axis`` produce the channels (Conv/Gemm/MatMul weight rows)
#: - "in":    a weight whose slices along ``axis`` consume the channels (next layer's input dim)
#: - "param": a per-channel vector/tensor sliced with the channels (bias, BN/LN/PRelu params, SE scale)
#: - "act":   an activation tensor carrying the channels (nothing to slice; shapes are re-inferred)
Role = Literal["out", "in", "param", "act"]


@dataclass(frozen=True)
class Member:
    """One place where a group's channels live."""

    tensor: str  # initializer or activation name
    axis: int  # axis of ``tensor`` holding the channels
    positions: tuple[tuple[int, ...], ...]  # positions[k]: indices on ``axis`` for group channel k
    role: Role
    node: str  # name of the node that reads/produces this member (for reports and --ignore)
    #: > 1 only for the weight of a general grouped Conv ("in", axis 1) or ConvTranspose ("out", axis 1):
    #: positions then index the op's full channel range (0..C-1), and the channels of block ``j``
    #: (``C / groups`` consecutive ones) live at ``tensor[rows of block j of axis 0, p - j * C / groups]``.
    #: Read such members with :mod:`onnxprune.channels.slices`.
    groups: int = 1


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
    #: static shapes (from the analysed view) of the tensors the rewriter needs to know
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: static values of tensors computed at run time in the model (shape computations feeding Reshape
    #: targets, Slice bounds, Split sizes) that the analysis relied on; the rewriter pins them
    values: dict[str, np.ndarray] = field(default_factory=dict)

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
