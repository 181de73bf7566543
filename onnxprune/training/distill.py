"""Losses: cross-entropy with label smoothing, and knowledge distillation (Hinton et al., 2015)."""
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
