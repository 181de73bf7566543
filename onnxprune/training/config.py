"""The retraining configuration, recorded with every result so comparisons can be checked for fairness."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..core.errors import OnnxPruneError
from .augment import OPS

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("cpu", "cuda", "auto")
OBJECTIVES = ("auto", "labels", "distill", "both")
#: with function matching, an epoch is at least this many steps (of augmented views)
FM_STEPS_PER_EPOCH = 200


@dataclass
class TrainConfig:
    """Everything that decides a retraining run (besides the data and the starting model).

    ``lr`` is the peak learning rate; ``schedule`` shapes it per iteration: ``cosine`` decays to 0
    over the epochs after a linear ``warmup_epochs``; ``step`` multiplies it by ``step_gamma`` at
    each fraction of the run in ``step_milestones``. ``distill_alpha`` weighs the distillation loss
    against cross-entropy when a teacher is given (ignored otherwise). ``grad_clip`` caps the global
    gradient norm of every step (0 = off): a freshly pruned network, or a distillation loss (up to
    ``T`` times the gradient of cross-entropy), can otherwise blow up in the first iterations.

    Batch-norm in the bridge: its scale and shift always train; ``train_bn=True`` also makes it
    normalise with batch statistics in training and update its running statistics (torch's
    ``BatchNorm`` in train mode). The default keeps the statistics frozen as in the file: a short
    retraining on a small or differently distributed set of batches should not overwrite
    statistics estimated on the full training data, and small batches make batch statistics noisy.

    ``objective``: ``labels`` (cross-entropy), ``distill`` (match the teacher on every graph output,
    no labels needed), ``both`` (``(1 - distill_alpha) * labels + distill_alpha * distill``);
    ``auto`` picks both with labels and a teacher, labels without a teacher, distill without labels.
    ``distill_features`` also matches intermediate features (:mod:`onnxprune.training.features`):
    a transformer's residual stream (every block's output; per-channel normalised MSE, padding
    positions of the attention mask ``feature_mask`` left out: ``auto`` finds it by name, ``none``
    counts every position), else the outputs of the pruned layers that keep the dense shape; the
    feature loss is added to the output loss times ``feature_weight``.

    Function matching (objective ``distill``, :mod:`onnxprune.training.augment`): ``augment``
    (``auto``, ``none`` or a list such as ``crop,jitter,mixup``) augments every batch, and teacher and
    student see the same augmented batch. With it an epoch is at least
    :data:`FM_STEPS_PER_EPOCH` steps (augmented views of the data, however few samples there are),
    the learning rate warms up over the first 5 % of the run unless ``warmup_epochs`` is set, and
    the held-out split (never augmented) picks the checkpoint. ``steps`` > 0 sizes any run in
    optimizer steps instead of epochs (0: by ``epochs``).
    """

    epochs: int = 10
    lr: float = 0.01
    schedule: str = "cosine"
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    batch_size: int = 64
    seed: int = 0
    distill_alpha: float = 0.5
    distill_temperature: float = 4.0
    warmup_epochs: float = 0.0
    step_milestones: tuple[float, ...] = (0.5, 0.75)
    step_gamma: float = 0.1
    train_bn: bool = False
    grad_clip: float = 5.0
    device: str = "cpu"
    eval_batch_size: int = 256
    objective: str = "auto"
    distill_features: bool = False
    feature_weight: float = 1.0
    feature_mask: str = "auto"
    steps: int = 0
    augment: str = "auto"

    def __post_init__(self) -> None:
        self.step_milestones = tuple(float(m) for m in self.step_milestones)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise OnnxPruneError(f"training config: {msg}")

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            bad(f"epochs must be a non-negative integer, got {self.epochs!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            bad(f"steps must be a non-negative integer (0: size the run by epochs), got {self.steps!r}")
        aug = str(self.augment).strip().lower()
        if not isinstance(self.augment, str) or (aug not in ("auto", "none") and (
                not aug or any(o.strip() not in OPS for o in aug.split(",")))):
            bad(f"augment must be auto, none or a comma-separated list of {', '.join(OPS)}, got {self.augment!r}")
        for name in ("lr", "momentum", "weight_decay", "label_smoothing", "distill_alpha", "distill_temperature",
                     "warmup_epochs", "step_gamma", "grad_clip", "feature_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{name} must be a non-negative number, got {v!r}")
        if not isinstance(self.feature_mask, str) or not self.feature_mask.strip():
            bad(f"feature_mask must be auto, none or the name of the attention-mask input, got {self.feature_mask!r}")
        if self.lr <= 0:
            bad(f"lr must be positive, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.objective not in OBJECTIVES:
            bad(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.device not in DEVICES:
            bad(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not self.label_smoothing < 1:
            bad(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not self.distill_alpha <= 1:
            bad(f"distill_alpha must be in [0, 1], got {self.distill_alpha!r}")
        if self.distill_temperature <= 0:
            bad(f"distill_temperature must be positive, got {self.distill_temperature!r}")
        for name in ("batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if any(not 0 < m < 1 for m in self.step_milestones):
            bad(f"step_milestones are fractions of the run in (0, 1), got {list(self.step_milestones)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TrainConfig":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise OnnxPruneError(f"training config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        d = self.to_dict()
        d.update({k: v for k, v in changes.items() if v is not None})
        return TrainConfig.from_dict(d)


def resolve_objective(objective: str, labeled: bool, has_teacher: bool) -> str:
    """The objective actually trained (``auto`` resolved), or one clear error when it cannot be."""
    if objective == "auto":
        if not labeled and not has_teacher:
            raise OnnxPruneError("the data has no labels: pass --teacher DENSE (the unpruned model) to retrain by "
                                 "distillation, or give labeled data")
        return ("both" if has_teacher else "labels") if labeled else "distill"
    if objective in ("labels", "both") and not labeled:
        raise OnnxPruneError(f"objective {objective} needs labels, and the data has none; use --objective distill "
                             "with --teacher DENSE")
    if objective in ("distill", "both") and not has_teacher:
        raise OnnxPruneError(f"objective {objective} needs a teacher: pass --teacher DENSE (the unpruned model)")
    return objective
