"""Channel importance criteria: one small pure function per criterion.

Every criterion scores the ``group.size`` channels of one :class:`~onnxprune.channels.types.Group`
from *all* its members (a residual group scores a channel by every conv that writes or reads it),
then :func:`aggregate` combines members. Each member's scores are first divided by their mean, so a
member with big tensors (a 3x3 conv reading 512 channels) does not drown a small one (a BN scale).

Higher score = more important = kept. Criteria read weights through :class:`ScoreInputs`, which a
caller builds from a :class:`~onnxprune.core.graph.GraphView` (:meth:`ScoreInputs.from_view`) or, in
tests, from plain dicts.

A criterion that cannot score a group (``bn`` on a group without BatchNormalization, ``taylor``
without gradients for any member) raises :class:`CriterionUnavailable`; the pruner leaves such
a group whole and says so in its notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..channels.quantized import dequantizing_reader
from ..channels.types import Group, Member
from ..core.errors import OnnxPruneError

#: Normalization ops whose input 1 is a per-channel scale (gamma): the "param" members that carry
#: a channel's magnitude. Biases, running statistics and other per-channel params are not scored
#: (as in torch-pruning's MagnitudeImportance with bias=False).
SCALE_OPS = ("BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization")


class CriterionUnavailable(OnnxPruneError):
    """This criterion cannot score this group (no BN, no gradients ...)."""


@dataclass(frozen=True)
class ScoreInputs:
    """What criteria may read: constant tensors, node op types and inputs, optional gradients."""

    const: Callable[[str], "np.ndarray | None"]  # initializer name -> array (None: not a constant)
    ops: Mapping[str, str] = field(default_factory=dict)  # node name -> op_type
    node_inputs: Mapping[str, Sequence[str]] = field(default_factory=dict)  # node name -> input names
    gradients: Mapping[str, np.ndarray] | None = None  # initializer name -> dLoss/dW (taylor)
    seed: int = 0
    #: consumer weight name -> per input-channel position, its contribution to the layer's outputs
    #: on calibration data (``activation``; :meth:`onnxprune.calibration.StructuredCalibration.channel_energies`)
    activations: Mapping[str, np.ndarray] | None = None
    #: consumer weight name -> [batches, input positions] label-free mask gradients (``fisher``;
    #: :meth:`onnxprune.calibration.StructuredCalibration.mask_gradients`)
    mask_gradients: Mapping[str, np.ndarray] | None = None
    #: per-position |w|**p sums already computed (see :func:`_power_sums`); filled by the scoring
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_view(cls, view, *, gradients: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                  activations: Mapping[str, np.ndarray] | None = None,
                  mask_gradients: Mapping[str, np.ndarray] | None = None) -> "ScoreInputs":
        nodes = view.nodes
        # QDQ weights (DequantizeLinear of an int8 initializer) are scored on their dequantized
        # values: the criterion the float model would use
        return cls(const=dequantizing_reader(view.model.graph, view.const), ops={n.name: n.op_type for n in nodes},
                   node_inputs={n.name: list(n.input) for n in nodes}, gradients=gradients, seed=seed,
                   activations=activations, mask_gradients=mask_gradients)

    def is_scale(self, m: Member) -> bool:
        """True when ``m`` is the gamma of a normalization op."""
        ins = self.node_inputs.get(m.node, ())
        return m.role == "param" and self.ops.get(m.node) in SCALE_OPS and len(ins) > 1 and ins[1] == m.tensor


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def channel_rows(arr: np.ndarray, m: Member) -> np.ndarray:
    """One row per position of ``m`` (the slice of ``arr`` that position owns), flattened: [positions, rest].

    Plain members: ``arr`` with the member axis first. Grouped members (``m.groups`` g > 1, the
    weight of a grouped Conv read on axis 1): position ``p`` of block ``j`` owns
    ``arr[rows of block j on axis 0, p - j * A1]``, so rows are gathered block by block."""
    a = np.asarray(arr)
    g = m.groups
    if g > 1:
        if m.axis != 1:
            raise ValueError(f"grouped member {m.tensor!r} on axis {m.axis}: expected axis 1")
        a0, a1 = a.shape[0], a.shape[1]
        blocks = a.reshape(g, a0 // g, a1, -1).transpose(0, 2, 1, 3)  # [g, A1, A0/g, rest]
        return blocks.reshape(g * a1, -1)
    a = np.moveaxis(a, m.axis, 0)
    return a.reshape(a.shape[0], -1)


def _owner_index(m: Member) -> tuple[np.ndarray, np.ndarray]:
    """(flat positions, owning group channel) over all ``m.positions``."""
    return m.positions.flat, m.positions.owner


def per_channel_sum(row_values: np.ndarray, m: Member) -> np.ndarray:
    """Sum per-position values into per-group-channel values using ``m.positions``."""
    flat, owner = _owner_index(m)
    return np.bincount(owner, weights=np.asarray(row_values, dtype=np.float64)[flat], minlength=len(m.positions))


def coverage(m: Member) -> np.ndarray | None:
    """Mask of the group channels ``m`` holds, or None when it holds all of them (the usual case;
    a Split/Slice output or the conv reading it holds only its window)."""
    held = m.positions.held()
    return None if held.all() else held


def channel_vectors(arr: np.ndarray, m: Member, channels: np.ndarray) -> np.ndarray:
    """One flat vector per group channel in ``channels`` (its rows concatenated); needs equal row counts."""
    rows = channel_rows(arr, m).astype(np.float64)
    channels = np.asarray(channels, dtype=np.int64).reshape(-1)
    counts = m.positions.counts[channels]
    if len(counts) and (counts != counts[0]).any():
        raise CriterionUnavailable(f"channels of {m.tensor!r} span unequal numbers of rows")
    idx = m.positions.of_channels(channels).reshape(len(channels), -1)
    return rows[idx].reshape(len(channels), -1)


#: Per-member scores: (score per group channel, coverage mask or None for all channels).
MemberScores = tuple[np.ndarray, "np.ndarray | None"]


def aggregate(per_member: Iterable[MemberScores], size: int) -> np.ndarray:
    """Per channel, the mean over the members holding it of their scores divided by the member's
    mean (over the channels it holds); all-zero members carry no information and are skipped."""
    num, cnt = np.zeros(size), np.zeros(size)
    for scores, mask in per_member:
        scores = np.asarray(scores, dtype=np.float64)
        mask = np.ones(size, dtype=bool) if mask is None else mask
        mean = float(scores[mask].mean()) if mask.any() else 0.0
        if not np.isfinite(mean) or mean <= 0:
            continue
        num[mask] += scores[mask] / mean
        cnt[mask] += 1
    return np.divide(num, cnt, out=np.zeros(size), where=cnt > 0)


def weight_members(group: Group, inp: ScoreInputs, roles: Sequence[str] = ("out", "in")) -> list[tuple[Member, np.ndarray]]:
    """Members that are constant weights of the given roles, plus normalization gammas, with their arrays."""
    out = []
    for m in group.members:
        if m.role in roles or inp.is_scale(m):
            arr = inp.const(m.tensor)
            if arr is not None and np.asarray(arr).ndim > m.axis:
                out.append((m, np.asarray(arr)))
    return out


def _norm_scores(group: Group, inp: ScoreInputs, p: int) -> np.ndarray:
    members = weight_members(group, inp)
    if not members:
        raise CriterionUnavailable(f"group {group.id} has no constant weights to score")
    per_member = []
    for m, arr in members:
        s = per_channel_sum(_power_sums(inp, arr, m, p), m)
        per_member.append((s if p == 1 else np.sqrt(s), coverage(m)))
    return aggregate(per_member, group.size)


def _power_sums(inp: ScoreInputs, arr: np.ndarray, m: Member, p: int) -> np.ndarray:
    """:func:`position_power_sums`, computing |w|**p once per weight for every axis the groups being
    scored read it on (a conv weight is the "out" member of one group and the "in" member of the next)."""
    if m.groups > 1:
        return position_power_sums(arr, m, p)
    key = (m.tensor, m.axis, p)
    cache = inp.cache
    if key in cache:
        return cache.pop(key)
    axes = cache.get("axes", {}).get(m.tensor, ())
    others = [a for a in axes if a != m.axis and a < np.ndim(arr)]
    if not others:
        return position_power_sums(arr, m, p)
    mag = np.abs(arr) if p == 1 else np.square(arr)
    for a in others:
        cache[(m.tensor, a, p)] = _mag_sums(mag, a, p)
    return _mag_sums(mag, m.axis, p)


def position_power_sums(arr: np.ndarray, m: Member, p: int) -> np.ndarray:
    """Sum of |w|**p (p = 1 or 2) over each position's slice along ``m.axis``, accumulated in
    float64 without copying the weight into a channel-major layout (the hot loop on big models)."""
    if m.groups > 1:
        rows = channel_rows(arr, m)
        return (np.abs(rows) if p == 1 else np.square(rows)).sum(1, dtype=np.float64)
    return _mag_sums(np.abs(arr) if p == 1 else np.square(arr), m.axis, p)


def _mag_sums(mag: np.ndarray, axis: int, p: int) -> np.ndarray:
    if p == 1 and axis == 1 and mag.ndim > 2:
        # axis 0 first (whole rows at a time), then the small rest: several times faster than
        # reducing (0, 2, ...) in one call for conv kernels (no strided inner loop). Only for p = 1:
        # float32 magnitudes sum exactly in float64 in any order (barring a > 2**29 spread of
        # magnitudes), so scores stay bit-identical; squares would round differently.
        return mag.sum(axis=0, dtype=np.float64).reshape(mag.shape[1], -1).sum(1)
    other = tuple(i for i in range(mag.ndim) if i != axis)
    return mag.sum(axis=other, dtype=np.float64) if other else mag.astype(np.float64)


# --------------------------------------------------------------------------------------------
# criteria
# --------------------------------------------------------------------------------------------

def l1(group: Group, inp: ScoreInputs) -> np.ndarray:
    """L1 norm of each channel's slices: rows of "out" weights, columns of "in" weights, and
    normalization gammas; per member divided by its mean, then averaged over members."""
    return _norm_scores(group, inp, 1)


def l2(group: Group, inp: ScoreInputs) -> np.ndarray:
    """As :func:`l1` with the L2 norm (sqrt of the sum of squares over the channel's slices)."""
    return _norm_scores(group, inp, 2)


def bn(group: Group, inp: ScoreInputs) -> np.ndarray:
    """|gamma| of the group's BatchNormalization scales (Network Slimming); averaged over BNs."""
    per_member = []
    for m in group.members:
        if inp.is_scale(m) and inp.ops.get(m.node) == "BatchNormalization":
            arr = inp.const(m.tensor)
            if arr is not None:
                per_member.append((per_channel_sum(np.abs(np.asarray(arr, dtype=np.float64).reshape(-1)), m), coverage(m)))
    if not per_member:
        raise CriterionUnavailable(f"group {group.id} has no BatchNormalization")
    return aggregate(per_member, group.size)


def fpgm(group: Group, inp: ScoreInputs) -> np.ndarray:
    """Filter Pruning via Geometric Median (He et al. 2019): a filter's score is its summed L2
    distance to the other filters of its layer; filters near the geometric median are redundant.

    Uses the "out" weights (the filters); a group without any falls back to its "in" weights."""
    members = [(m, a) for m, a in weight_members(group, inp, roles=("out",)) if m.role == "out"]
    if not members:
        members = [(m, a) for m, a in weight_members(group, inp, roles=("in",)) if m.role == "in"]
    if not members:
        raise CriterionUnavailable(f"group {group.id} has no constant weights")
    per_member = []
    for m, arr in members:
        mask = coverage(m)
        held = np.arange(group.size) if mask is None else np.nonzero(mask)[0]
        f = channel_vectors(arr, m, held)
        sq = np.einsum("ij,ij->i", f, f)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (f @ f.T), 0.0)
        s = np.zeros(group.size)
        s[held] = np.sqrt(d2).sum(1)
        per_member.append((s, mask))
    return aggregate(per_member, group.size)


def lamp_transform(s: np.ndarray) -> np.ndarray:
    """LAMP score (Lee et al. 2021) of magnitudes ``s`` (squared norms): s_u / sum_{v >= u} s_v
    over the ascending order; the largest scores 1. Self-normalizing per layer."""
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(s, kind="stable")
    srt = s[order]
    tail = np.cumsum(srt[::-1])[::-1]  # sum of srt[i:]
    out = np.empty_like(s)
    out[order] = np.divide(srt, tail, out=np.zeros_like(srt), where=tail > 0)
    return out


def lamp(group: Group, inp: ScoreInputs) -> np.ndarray:
    """LAMP at channel level: the squared-L2 magnitude of each channel (aggregated over members as
    in :func:`l2`, squared) turned into LAMP scores within the group."""
    return lamp_transform(np.square(_norm_scores(group, inp, 2)))


def random(group: Group, inp: ScoreInputs) -> np.ndarray:
    """Uniform random scores, reproducible from ``(seed, group id)`` whatever the group order."""
    return np.random.default_rng([inp.seed, group.id]).random(group.size)


def taylor(group: Group, inp: ScoreInputs) -> np.ndarray:
    """First-order Taylor (Molchanov et al. 2019): |sum over a channel's slices of w * dL/dw| per
    weight member with a gradient, normalized per member and averaged."""
    if inp.gradients is None:
        raise OnnxPruneError("criterion taylor needs --data")
    per_member = []
    for m, arr in weight_members(group, inp, roles=("out", "in", "param")):
        g = inp.gradients.get(m.tensor)
        if g is None:
            continue
        if np.shape(g) != arr.shape:
            raise OnnxPruneError(f"gradient of {m.tensor!r} has shape {np.shape(g)}, weight has {arr.shape}")
        prod = channel_rows(arr.astype(np.float64) * np.asarray(g, dtype=np.float64), m).sum(1)
        per_member.append((np.abs(per_channel_sum(prod, m)), coverage(m)))
    if not per_member:
        raise CriterionUnavailable(f"no gradients for the weights of group {group.id}")
    return aggregate(per_member, group.size)


def activation(group: Group, inp: ScoreInputs) -> np.ndarray:
    """Data-driven: the output variance each channel contributes to the layers consuming it, on
    calibration data (their weights times the channel's activations; Luo et al. 2017, He et al. 2017),
    per consumer normalized and averaged. Channels of a group no linear layer consumes cannot be scored."""
    if inp.activations is None:
        raise OnnxPruneError("criterion activation needs calibration data (--calibrate SPEC)")
    per_member = [(per_channel_sum(inp.activations[m.tensor], m), coverage(m)) for m in group.members
                  if m.role == "in" and m.groups == 1 and m.tensor in inp.activations
                  and len(inp.activations[m.tensor]) > int(m.positions.flat.max(initial=-1))]
    if not per_member:
        raise CriterionUnavailable(f"group {group.id}: no re-fittable linear layer consumes its channels")
    return aggregate(per_member, group.size)


def fisher_channel_gradients(group: Group, inp: ScoreInputs) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per member that a differentiable weight reads the group's channels through, the mask gradient
    of each group channel on every batch, ``[batches, group.size]`` (a channel's positions summed: a
    head's head_dim columns), with the member's :func:`coverage`."""
    if inp.mask_gradients is None:
        raise OnnxPruneError("criterion fisher needs calibration data (--calibrate SPEC)")
    out = []
    for m in group.members:
        grads = inp.mask_gradients.get(m.tensor) if m.role == "in" and m.groups == 1 else None
        if grads is None or grads.shape[1] <= int(m.positions.flat.max(initial=-1)):
            continue
        per_channel = np.zeros((len(grads), group.size))
        np.add.at(per_channel, (slice(None), m.positions.owner), grads[:, m.positions.flat])
        out.append((per_channel, coverage(m)))
    return out


def fisher(group: Group, inp: ScoreInputs) -> np.ndarray:
    """Label-free Fisher information of each channel's mask (Kwon et al. 2022): per batch of
    calibration samples, the mask gradient of the output's distance to dense, summed over the
    channel's positions (a head: its head_dim columns of the output projection), squared, summed
    over the batches (:mod:`onnxprune.calibration.fisher`); per consumer normalized and averaged."""
    per_member = [(np.square(g).sum(0), cov) for g, cov in fisher_channel_gradients(group, inp)]
    if not per_member:
        raise CriterionUnavailable(f"group {group.id}: no differentiable weight consumes its channels")
    return aggregate(per_member, group.size)


Criterion = Callable[[Group, ScoreInputs], np.ndarray]

IMPORTANCE: dict[str, Criterion] = {
    "l1": l1,
    "l2": l2,
    "bn": bn,
    "fpgm": fpgm,
    "lamp": lamp,
    "random": random,
    "taylor": taylor,
    "activation": activation,
    "fisher": fisher,
}

#: Criteria whose scores are already comparable across groups (global ranking uses them as they are).
SELF_NORMALIZED = frozenset({"lamp", "random"})


def score_groups(groups: Iterable[Group], criterion: str, inp: ScoreInputs) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Scores of every group, and for groups the criterion cannot score, why."""
    if criterion not in IMPORTANCE:
        raise OnnxPruneError(f"unknown criterion {criterion!r}; choose from {', '.join(IMPORTANCE)}")
    fn = IMPORTANCE[criterion]
    groups = list(groups)
    axes: dict[str, set[int]] = {}  # weight -> axes the groups read it on (plain members)
    for g in groups:
        for m in g.members:
            if m.groups == 1 and m.role in ("out", "in", "param"):
                axes.setdefault(m.tensor, set()).add(m.axis)
    inp.cache.clear()
    inp.cache["axes"] = {k: sorted(v) for k, v in axes.items() if len(v) > 1}
    scores, unavailable = {}, {}
    for g in groups:
        try:
            s = np.asarray(fn(g, inp), dtype=np.float64)
        except CriterionUnavailable as exc:
            unavailable[g.id] = str(exc)
            continue
        if s.shape != (g.size,):
            raise AssertionError(f"criterion {criterion} returned shape {s.shape} for group {g.id} of size {g.size}")
        scores[g.id] = s
    inp.cache.clear()
    return scores, unavailable
