"""``--distill-features``: which intermediate tensors the student matches, and the loss on them.

A transformer is matched on its residual stream (:mod:`.stream`: every block's output keeps the
dense width when heads and FFN columns are pruned), with a mean squared error in which each channel
is divided by the teacher's standard deviation of that channel (a few outlier channels of a large
stream do not drown the rest) and padding positions (the attention mask) count nowhere: their
hidden states are never used, and on short padded sentences they are most of the rows. A model
without a residual stream (a CNN) is matched, as before, at the outputs of its pruned layers that
keep the dense shape (smooth-L1 per channel, axis 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import onnx
from onnx import numpy_helper

from ..calibration.mask import mask_input
from ..core.errors import OnnxPruneError
from ..datasets import DatasetSplits
from .loop import as_tensors, outputs_of
from .stream import residual_stream

_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
STREAM, PRUNED_LAYERS = "residual_stream", "pruned_layers"


@dataclass
class FeatureMatch:
    """The features matched past the graph outputs, and where they are (``at``: :data:`STREAM` or
    :data:`PRUNED_LAYERS`). ``mask_index``: position of the attention-mask input among the model's
    inputs (None: every position counts)."""

    names: list[str]
    at: str
    mask_name: str | None = None
    mask_index: int | None = None
    scales: list = field(default_factory=list)

    def prepare(self, teacher, data: DatasetSplits, n_outputs: int, *, batch_size: int, device: str) -> None:
        """The teacher's per-channel std of every feature on the training data (once, before training)."""
        self.scales = stream_scales(teacher, data, n_outputs, len(self.names), self.mask_index,
                                    batch_size=batch_size, device=device)

    def __call__(self, student: Sequence, teacher: Sequence, inputs: Sequence):
        mask = inputs[self.mask_index] if self.mask_index is not None else None
        return stream_loss(student, teacher, self.scales, mask)

    @property
    def loss(self) -> "FeatureMatch | None":
        """The loop's feature loss: this one on the residual stream; None for pruned layers, which
        the loop matches as values (smooth-L1 per channel, axis 1)."""
        return self if self.at == STREAM else None

    def describe(self) -> dict[str, Any]:
        return {"distill_features": list(self.names), "distill_features_at": self.at,
                "distill_features_mask": self.mask_name}


def select_features(student: onnx.ModelProto, teacher: onnx.ModelProto, data: DatasetSplits,
                    mask: str = "auto") -> FeatureMatch:
    """The residual stream where the teacher has one (tensors of the same name and shape in both
    models on a batch of the data), else the pruned layers' outputs; with the padding mask input
    (``mask``: ``auto`` finds it by name, ``none`` turns it off, else an input name)."""
    names = _same_in_both(student, teacher, data, residual_stream(teacher))
    if not names:
        return FeatureMatch(_same_in_both(student, teacher, data, pruned_layer_outputs(student, teacher)),
                            PRUNED_LAYERS)
    x, _ = next(data.train.batches(2))
    feeds = dict(x) if isinstance(x, Mapping) else {}
    if mask == "none":
        return FeatureMatch(names, STREAM)
    name = mask_input(teacher, feeds, None if mask == "auto" else mask, option="--feature-mask")
    return FeatureMatch(names, STREAM, name, list(feeds).index(name) if name is not None else None)


def pruned_layer_outputs(student: onnx.ModelProto, teacher: onnx.ModelProto) -> list[str]:
    """Outputs of the pruned layers (Conv, ConvTranspose, Gemm, MatMul whose weight differs from the
    teacher's in shape or in zeros): the consumers of removed channels, and masked layers."""
    s_init = {t.name: t for t in student.graph.initializer}
    t_init = {t.name: t for t in teacher.graph.initializer}
    outputs = {o.name for o in student.graph.output}
    t_produced = {o for n in teacher.graph.node for o in n.output}
    cands = []
    for n in student.graph.node:
        if n.op_type not in _LAYER_OPS or len(n.input) < 2 or not n.output or n.output[0] in outputs:
            continue
        w = n.input[1]
        if w not in s_init or w not in t_init or n.output[0] not in t_produced:
            continue
        a, b = numpy_helper.to_array(s_init[w]), numpy_helper.to_array(t_init[w])
        if a.shape != b.shape or int((a == 0).sum()) != int((b == 0).sum()):
            cands.append(n.output[0])
    return cands


def _same_in_both(student: onnx.ModelProto, teacher: onnx.ModelProto, data: DatasetSplits,
                  cands: list[str]) -> list[str]:
    """The float ``cands`` both models compute with the same shape on a batch of validation data."""
    import torch  # lazy: torch ([train] extra)

    from ..bridge import to_torch  # lazy: imports torch

    outputs = {o.name for o in student.graph.output} | {o.name for o in teacher.graph.output}
    cands = [c for c in cands if c not in outputs]
    if not cands:
        return []
    x, _ = next(data.val.batches(2))
    with torch.no_grad():
        sv = to_torch(student).eval().run(as_tensors(x, "cpu"), keep_all=True)
        tv = to_torch(teacher).eval().run(as_tensors(x, "cpu"), keep_all=True)
    return [c for c in cands if c in sv and c in tv and tuple(sv[c].shape) == tuple(tv[c].shape)
            and sv[c].is_floating_point()]


def channel_rows(t, mask=None):
    """``t`` as rows x channels (channel: the last axis up to 3-D, axis 1 for 4-D and up), keeping
    only the rows of real tokens when ``mask`` ([batch, seq] of 0/1) lines up with ``t``'s positions
    ([batch, seq, C], or [batch * seq, C])."""
    if t.dim() <= 1:
        return t.reshape(-1, 1)
    if t.dim() >= 4:
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    rows = t.reshape(-1, t.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0] and (t.dim() == 2 or tuple(t.shape[:2]) == tuple(mask.shape)):
        rows = rows[mask.reshape(-1) != 0]
    return rows


def stream_loss(student: Sequence, teacher: Sequence, scales: Sequence, mask=None):
    """Mean over features of the squared difference, each channel divided by the teacher's std of
    that channel (``scales``), over real-token rows only (``mask``); 0 when the student matches."""
    import torch  # lazy: torch ([train] extra)

    losses = []
    for s, t, sd in zip(student, teacher, scales):
        rs, rt = channel_rows(s.float(), mask), channel_rows(t.detach().float(), mask)
        if rs.shape[0] == 0:
            continue
        losses.append((((rs - rt) / sd.to(rs.device)) ** 2).mean())
    if not losses:
        return torch.zeros((), device=student[0].device if len(student) else "cpu")
    return torch.stack(losses).mean()


def stream_scales(teacher, data: DatasetSplits, n_outputs: int, n_features: int, mask_index: int | None, *,
                  batch_size: int = 256, device: str = "cpu", max_batches: int = 32) -> list:
    """Per feature (the teacher's ``n_features`` outputs past ``n_outputs``): its std per channel over the real
    tokens of at most ``max_batches`` training batches (float64, centred, Chan's parallel update),
    floored at 1e-3 of the mean channel's so a constant channel does not blow its error up."""
    import torch  # lazy: torch ([train] extra)

    stats: dict[int, tuple] = {}
    with torch.no_grad():
        for b, (x, _) in enumerate(data.split("train").batches(batch_size)):
            if b >= max_batches:
                break
            xs = as_tensors(x, device)
            mask = xs[mask_index] if mask_index is not None else None
            for i, t in enumerate(outputs_of(teacher(*xs))[n_outputs:]):
                rows = channel_rows(t.double(), mask)
                if rows.shape[0]:
                    stats[i] = _chan(stats.get(i), rows)
    if len(stats) != n_features:
        raise OnnxPruneError("--distill-features: the attention mask leaves no token of the training data")
    out = []
    for i in range(n_features):
        cnt, _, m2 = stats[i]
        std = torch.sqrt(m2 / max(cnt - 1, 1)).float()
        out.append(std.clamp_min(max(float(std.mean()) * 1e-3, 1e-6)))
    return out


def _chan(prev: tuple | None, rows) -> tuple:
    """Chan et al.'s update of (count, mean, sum of squared deviations) per column with ``rows``."""
    cnt, mean = rows.shape[0], rows.mean(0)
    m2 = ((rows - mean) ** 2).sum(0)
    if prev is None:
        return cnt, mean, m2
    c0, mu0, s0 = prev
    tot = c0 + cnt
    delta = mean - mu0
    return tot, mu0 + delta * cnt / tot, s0 + m2 + delta ** 2 * c0 * cnt / tot

