"""Losses: cross-entropy with label smoothing, knowledge distillation (Hinton et al., 2015), and
label-free distillation over every graph output by its kind (class scores and probabilities: KL;
embeddings: 1 - cosine; values: smooth-L1 normalised per channel), which is how a detector, a
segmenter or an encoder is retrained from its dense original alone."""
from __future__ import annotations


def distillation_loss(student_logits, teacher_logits, temperature: float = 4.0):
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient scale comparable to cross-entropy across temperatures.
    """
    import torch.nn.functional as F  # lazy: torch ([train] extra)

    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def training_loss(student_logits, labels, *, teacher_logits=None, alpha: float = 0.5, temperature: float = 4.0,
                  label_smoothing: float = 0.0):
    """``(1 - alpha) * CE(student, labels) + alpha * KD(student, teacher)``; plain CE without a teacher."""
    import torch.nn.functional as F  # lazy: torch ([train] extra)

    ce = F.cross_entropy(student_logits, labels, label_smoothing=float(label_smoothing))
    if teacher_logits is None or alpha <= 0:
        return ce
    kd = distillation_loss(student_logits, teacher_logits, temperature)
    return (1.0 - alpha) * ce + alpha * kd


def is_class_scores(t) -> bool:
    """N x classes scores (2-D float, >= 2 columns, after squeezing trailing 1-sized dims): the
    outputs distilled with KL; every other output (maps, boxes, embeddings) with smooth-L1."""
    if not t.is_floating_point() or t.dim() < 2:
        return False
    if t.dim() > 2 and any(d != 1 for d in t.shape[2:]):
        return False
    return int(t.shape[1]) >= 2


def channel_scale(t, eps: float = 1e-6):
    """The teacher's standard deviation per channel (axis 1; one channel for 1-D outputs), shaped to
    broadcast against ``t``. Channels that barely move get the mean channel's scale times 1e-3
    instead of ~0, so a constant channel does not blow its error up."""
    t = t.detach().float()
    if t.dim() < 2:
        std = t.std() if t.numel() > 1 else t.abs().clamp_min(1.0).reshape(())
        return std.clamp_min(eps)
    dims = [d for d in range(t.dim()) if d != 1]
    std = t.std(dim=dims) if t.numel() // t.shape[1] > 1 else t.abs().amax(dim=dims).clamp_min(1.0)
    return shape_scale(std, t)


def shape_scale(std, like, eps: float = 1e-6):
    """Per-channel ``std`` (C,) floored (1e-3 of the mean channel's, and ``eps``), shaped (1, C, 1, ...)."""
    std = std.float().to(like.device)
    if like.dim() < 2:
        return std.reshape(()).clamp_min(eps) if std.numel() == 1 else std.mean().clamp_min(eps)
    floor = max(float(std.mean()) * 1e-3, eps)
    return std.clamp_min(floor).reshape(1, -1, *([1] * (like.dim() - 2)))


def regression_distill_loss(student, teacher, scale=None):
    """Smooth-L1 between student and teacher, each channel (axis 1) divided by the teacher's
    standard deviation of that channel (``scale``: measured on the data beforehand; None: on this
    batch): a detection head's box pixels do not swamp its class logits in the same tensor, outputs
    of any scale weigh alike, and the loss is 0 exactly when the student matches."""
    import torch.nn.functional as F  # lazy: torch ([train] extra)

    t = teacher.detach().float()
    s = channel_scale(t) if scale is None else scale
    return F.smooth_l1_loss(student.float() / s, t / s, beta=1.0)


def embedding_distill_loss(student, teacher):
    """``1 - cosine`` along the last axis (one embedding per row), averaged: an embedding is used by
    direction, and KL at temperature on L2-normalised values (all within +-1) is ~0 whatever the
    student does."""
    import torch.nn.functional as F  # lazy: torch ([train] extra)

    s, t = student.float(), teacher.detach().float()
    if s.dim() < 2:
        s, t = s.reshape(1, -1), t.reshape(1, -1)
    return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()


def _classes_last(x):
    """N x C x ... -> (N * ...) x C, so class scores with spatial axes are matched per position."""
    if x.dim() <= 2:
        return x.reshape(x.shape[0], -1)
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def kind_loss(kind: str, student, teacher, *, temperature: float = 4.0, scale=None):
    """The distillation loss of one output of ``kind`` (see :mod:`onnxprune.datasets.output_kind`)."""
    import torch  # lazy: torch ([train] extra)

    if kind in ("scores", "probs"):
        s2, t2 = _classes_last(student), _classes_last(teacher.detach())
        if kind == "probs":
            s2, t2 = torch.log(s2.clamp_min(1e-12)), torch.log(t2.clamp_min(1e-12))
        return distillation_loss(s2, t2, temperature)
    if kind == "embedding":
        return embedding_distill_loss(student, teacher)
    return regression_distill_loss(student, teacher, scale)


def legacy_kinds(outs, probs=(), classes=None) -> list[str]:
    """Kinds from the older arguments: ``probs`` indices, ``classes`` indices (None: any N x C
    output is class scores, as a plain classifier module's output is), the rest values."""
    kinds = []
    for i, t in enumerate(outs):
        if i in probs:
            kinds.append("probs")
        elif is_class_scores(t) and (classes is None or i in classes):
            kinds.append("scores")
        else:
            kinds.append("value")
    return kinds


def outputs_distill_loss(student_outs, teacher_outs, *, temperature: float = 4.0, probs=(), classes=None,
                         kinds=None, scales=None):
    """Mean over graph outputs of :func:`kind_loss` by each output's kind (``kinds``; None: from
    ``probs``/``classes``, :func:`legacy_kinds`). ``scales``: per output, the teacher's per-channel
    std measured on the data (None entries: per batch). Integer outputs are skipped."""
    import torch  # lazy: torch ([train] extra)

    if len(student_outs) != len(teacher_outs):
        raise ValueError(f"student has {len(student_outs)} outputs, teacher {len(teacher_outs)}")
    kinds = list(kinds) if kinds is not None else legacy_kinds(student_outs, probs, classes)
    losses = []
    for i, (s, t) in enumerate(zip(student_outs, teacher_outs)):
        if not (s.is_floating_point() and t.is_floating_point()):
            continue  # integer outputs (indices, counts) carry no gradient
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(f"output {i}: student shape {tuple(s.shape)}, teacher {tuple(t.shape)}")
        scale = scales[i] if scales is not None and i < len(scales) else None
        losses.append(kind_loss(kinds[i], s, t, temperature=temperature, scale=scale))
    if not losses:
        raise ValueError("no float output to distil")
    return torch.stack(losses).mean()
