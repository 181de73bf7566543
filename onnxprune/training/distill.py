"""Losses: cross-entropy with label smoothing, knowledge distillation (Hinton et al., 2015), and
label-free distillation over every graph output (class scores: KL; anything else: scale-normalized
smooth-L1), which is how a detector or a segmenter is retrained from its dense original alone."""
from __future__ import annotations


def distillation_loss(student_logits, teacher_logits, temperature: float = 4.0):
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient scale comparable to cross-entropy across temperatures.
    """
    import torch.nn.functional as F

    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def training_loss(student_logits, labels, *, teacher_logits=None, alpha: float = 0.5, temperature: float = 4.0,
                  label_smoothing: float = 0.0):
    """``(1 - alpha) * CE(student, labels) + alpha * KD(student, teacher)``; plain CE without a teacher."""
    import torch.nn.functional as F

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


def regression_distill_loss(student, teacher, eps: float = 1e-6):
    """Smooth-L1 between student and teacher, both divided by the teacher's standard deviation over
    the batch: outputs of any scale (pixels, box coordinates, logits maps) weigh alike, and the
    loss is 0 exactly when the student matches."""
    import torch.nn.functional as F

    scale = teacher.detach().float().std().clamp_min(eps) if teacher.numel() > 1 else teacher.detach().abs().clamp_min(1.0)
    return F.smooth_l1_loss(student.float() / scale, teacher.detach().float() / scale, beta=1.0)


def outputs_distill_loss(student_outs, teacher_outs, *, temperature: float = 4.0, probs=(), classes=None):
    """Mean over graph outputs of :func:`distillation_loss` (class scores; log taken first for
    outputs in ``probs``, the indices that are probabilities) or :func:`regression_distill_loss`.
    ``classes``: indices of the class-score outputs (None: every N x C output, :func:`is_class_scores`)."""
    import torch

    if len(student_outs) != len(teacher_outs):
        raise ValueError(f"student has {len(student_outs)} outputs, teacher {len(teacher_outs)}")
    losses = []
    for i, (s, t) in enumerate(zip(student_outs, teacher_outs)):
        if not (s.is_floating_point() and t.is_floating_point()):
            continue  # integer outputs (indices, counts) carry no gradient
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(f"output {i}: student shape {tuple(s.shape)}, teacher {tuple(t.shape)}")
        if is_class_scores(s) and (classes is None or i in classes):
            s2, t2 = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
            if i in probs:
                s2, t2 = torch.log(s2.clamp_min(1e-12)), torch.log(t2.clamp_min(1e-12))
            losses.append(distillation_loss(s2, t2, temperature))
        else:
            losses.append(regression_distill_loss(s, t))
    if not losses:
        raise ValueError("no float output to distil")
    return torch.stack(losses).mean()
