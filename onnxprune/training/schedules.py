"""Learning-rate schedules as plain functions of (fractional) epoch (no torch needed).

The loop sets the learning rate before every iteration to ``lr * lr_factor(config, epoch + i / n)``.
"""
from __future__ import annotations

import math

from .config import TrainConfig


def warmup_factor(t: float, warmup: float) -> float:
    """Linear warm-up: ``t / warmup`` (at least 1e-3) until ``warmup`` epochs, then 1."""
    if warmup <= 0 or t >= warmup:
        return 1.0
    return max(t / warmup, 1e-3)


def cosine_factor(t: float, total: float, warmup: float = 0.0) -> float:
    """Half-cosine from 1 at the end of warm-up to 0 at ``total`` epochs."""
    if t < warmup:
        return warmup_factor(t, warmup)
    span = max(total - warmup, 1e-12)
    p = min(max((t - warmup) / span, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * p))


def step_factor(t: float, total: float, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1,
                warmup: float = 0.0) -> float:
    """``gamma ** k`` where ``k`` milestones (fractions of ``total``) have passed; changes at whole epochs."""
    if t < warmup:
        return warmup_factor(t, warmup)
    epoch = math.floor(t + 1e-9)
    k = sum(1 for m in milestones if epoch >= round(m * total))
    return gamma ** k


def lr_factor(config: TrainConfig, t: float, total: float | None = None, warmup: float | None = None) -> float:
    """The schedule's multiplier of ``config.lr`` at fractional epoch ``t`` of a run of ``total``
    epochs (default ``config.epochs``; a run sized in steps passes ``steps / steps_per_epoch``) with
    ``warmup`` epochs of linear warm-up (default ``config.warmup_epochs``)."""
    total = config.epochs if total is None else total
    warmup = config.warmup_epochs if warmup is None else warmup
    if config.schedule == "cosine":
        return cosine_factor(t, total, warmup)
    if config.schedule == "step":
        return step_factor(t, total, config.step_milestones, config.step_gamma, warmup)
    return warmup_factor(t, warmup)


def lr_at(config: TrainConfig, t: float, total: float | None = None, warmup: float | None = None) -> float:
    return config.lr * lr_factor(config, t, total, warmup)
