"""The retraining loop (on any ``nn.Module``) and ``finetune`` (ONNX in, ONNX out, through the bridge).

What the loop does, in order, every run:

* seeds ``torch`` and the data shuffling from ``config.seed`` and turns on
  ``torch.use_deterministic_algorithms(True, warn_only=True)`` for the run (restored afterwards), so
  the same inputs give the same weights on the same machine and thread count;
* evaluates the starting weights on the **validation** split (the "epoch 0" candidate), then for
  every epoch: shuffled mini-batches, the learning rate set per iteration from the schedule,
  cross-entropy with label smoothing (plus distillation from the teacher when given), one optimizer
  step, then ``after_step`` (``finetune`` uses it to re-apply the pruning masks, so zeros stay exactly
  zero), and a validation pass;
* without labels (``objective`` distill), the loss matches the teacher on every graph output and
  checkpoints are chosen by validation fidelity to the teacher (top-1 agreement for class-score
  outputs, relative L2 error for the others) instead of top-1;
* keeps the weights of the best validation top-1 (ties go to the lower validation loss; the
  starting weights are a candidate too: retraining never returns something worse on validation than
  it was given) and loads them at the end. The test split is not looked at here; ``finetune`` reports it once, at the end,
  on the written ONNX model through ONNX Runtime.

Weight decay applies to weight tensors (2-D and up) only, not to biases and norm scales/shifts.
``config.batch_size`` is the global batch: under DDP each of the ``W`` processes takes ``1/W`` of it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..datasets import DatasetSplits, load_dataset
from ..errors import OnnxPruneError
from .config import TrainConfig
from .schedules import lr_at


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run (``world_size == 1``: not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "DistContext":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import UnavailableError
        raise UnavailableError("device cuda requested but torch sees no CUDA GPU")
    return name


def logits_of(out: Any):
    """The first tensor of a module's output, as N x classes."""
    if isinstance(out, Mapping):
        out = next(iter(out.values()))
    while isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() > 2 and all(d == 1 for d in out.shape[2:]):
        out = out.reshape(out.shape[0], -1)
    return out


class _Progress:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(description, total=total, info="")
            self.bar.start()

    def advance(self, info: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, **({"info": info} if info is not None else {}))

    def info(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def as_tensors(x: Any, device: str) -> list:
    """One batch (an array, or a dict of per-input arrays in graph-input order) as input tensors."""
    import torch

    arrays = list(x.values()) if isinstance(x, Mapping) else [x]
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in arrays]


def outputs_of(out: Any) -> tuple:
    """A module's output(s) as a tuple of tensors, in graph-output order."""
    if isinstance(out, Mapping):
        return tuple(out.values())
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def evaluate_module(module, data: DatasetSplits, split: str = "val", batch_size: int = 256, *, device: str = "cpu",
                    output_is_prob: bool = False) -> dict[str, float]:
    """Top-1 and mean cross-entropy of a torch module on a split (eval mode, no gradients)."""
    import torch
    import torch.nn.functional as F

    part = data.split(split)
    was_training = module.training
    module.eval()
    n = correct = 0
    loss_sum = 0.0
    with torch.no_grad():
        for x, y in part.batches(batch_size):
            yt = torch.from_numpy(y).to(device)
            logits = _scores(logits_of(module(*as_tensors(x, device))), output_is_prob)
            loss_sum += float(F.cross_entropy(logits, yt, reduction="sum"))
            correct += int((logits.argmax(1) == yt).sum())
            n += len(y)
    module.train(was_training)
    return {"top1": correct / max(n, 1), "loss": loss_sum / max(n, 1), "samples": n}


def fidelity_module(module, teacher, data: DatasetSplits, split: str = "val", batch_size: int = 256, *,
                    device: str = "cpu", n_outputs: int | None = None,
                    classes: "Sequence[int] | None" = None) -> dict[str, Any]:
    """How closely ``module`` follows ``teacher`` on a split (no labels needed), streaming.

    Per graph output: ``||s - t|| / ||t||`` over the whole split; for class-score outputs also the
    share of samples with the teacher's arg-max class. ``error`` (what checkpoints minimise without
    labels) averages ``1 - top1_agreement`` for class scores (output indices ``classes``; None: any
    N x C output) (KL distillation matches the softmax,
    not the logits' offset and scale) and ``rel_l2`` for every other output; ``rel_l2`` is the mean
    relative L2 error over all outputs."""
    import torch

    from .distill import is_class_scores

    part = data.split(split)
    was_training = module.training
    module.eval()
    num: list[float] = []
    den: list[float] = []
    agree: list[int | None] = []
    n = 0
    with torch.no_grad():
        for x, _ in part.batches(batch_size):
            xs = as_tensors(x, device)
            so, to = outputs_of(module(*xs)), outputs_of(teacher(*xs))
            so, to = so[:n_outputs or len(so)], to[:n_outputs or len(to)]
            if not num:
                num, den = [0.0] * len(so), [0.0] * len(so)
                agree = [0 if is_class_scores(t) and (classes is None or i in classes) else None
                         for i, t in enumerate(to)]
            for i, (a, b) in enumerate(zip(so, to)):
                num[i] += float(((a.double() - b.double()) ** 2).sum())
                den[i] += float((b.double() ** 2).sum())
                if agree[i] is not None:
                    agree[i] += int((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).sum())
            n += len(xs[0])
    module.train(was_training)
    rel = [(a ** 0.5) / (b ** 0.5) if b > 0 else (0.0 if a == 0 else math.inf) for a, b in zip(num, den)]
    agreement = [None if c is None else c / max(n, 1) for c in agree]
    err = [r if g is None else 1.0 - g for r, g in zip(rel, agreement)]
    scored = [g for g in agreement if g is not None]
    return {"rel_l2": float(np.mean(rel)) if rel else 0.0, "error": float(np.mean(err)) if err else 0.0,
            "top1_agreement": float(np.mean(scored)) if scored else None, "per_output_rel_l2": rel, "samples": n}


def _scores(logits, output_is_prob: bool):
    """Log-probabilities when the model outputs probabilities (a final Softmax), raw logits otherwise."""
    if not output_is_prob:
        return logits
    import torch
    return torch.log(logits.clamp_min(1e-12))


def _train_batches(data: DatasetSplits, config: TrainConfig, epoch: int, dist: DistContext) -> Iterator:
    part = data.split("train")
    bs = max(1, config.batch_size // dist.world_size)
    seed = config.seed * 100003 + epoch
    if part.in_memory:
        if dist.active:
            from torch.utils.data import DistributedSampler
            sampler = DistributedSampler(range(len(part)), num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                         seed=config.seed)
            sampler.set_epoch(epoch)
            return part.batches(bs, indices=np.fromiter(iter(sampler), dtype=np.int64))
        return part.batches(bs, shuffle=True, seed=seed)
    if dist.active:  # user loaders: shard whole batches; every rank gets the same count (DDP needs that)
        n = len(part.loader) if hasattr(part.loader, "__len__") else -1
        if n < dist.world_size:
            raise OnnxPruneError("data-parallel training over a DataLoader needs a loader with a known length "
                                 ">= the number of processes")
        keep = [i for i in range((n // dist.world_size) * dist.world_size) if i % dist.world_size == dist.rank]
        return part.batches(indices=np.asarray(keep))
    return part.batches()


def _n_train_batches(data: DatasetSplits, config: TrainConfig, dist: DistContext) -> int:
    part = data.split("train")
    if part.in_memory:
        per_rank = math.ceil(len(part) / dist.world_size)
        return math.ceil(per_rank / max(1, config.batch_size // dist.world_size))
    n = len(part.loader) if hasattr(part.loader, "__len__") else 0
    return n // dist.world_size if dist.active else n


def make_optimizer(params, config: TrainConfig):
    import torch

    params = [p for p in params if p.requires_grad]
    if not params:
        raise OnnxPruneError("nothing to train: the model has no trainable float weights")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=bool(config.nesterov and config.momentum > 0))
    return torch.optim.AdamW(groups, lr=config.lr)


def train_module(module, data: "DatasetSplits | str", config: TrainConfig | None = None, *, teacher=None,
                 after_step: Callable[[], None] | None = None, progress: bool = True,
                 output_is_prob: bool = False, dist: DistContext | None = None,
                 description: str = "retrain", prob_outputs: Sequence[int] = (),
                 n_outputs: int | None = None, class_outputs: Sequence[int] | None = None) -> dict[str, Any]:
    """Train ``module`` in place with ``config``; load the best-on-validation weights; return the history.

    ``teacher``: a module distilled into ``module`` (``config.objective``, ``config.distill_alpha``):
    every graph output is matched (:func:`~onnxprune.training.distill.outputs_distill_loss`); outputs
    past ``n_outputs`` are intermediate features (``--distill-features``), matched by smooth-L1.
    ``prob_outputs``: indices of outputs that are probabilities (``output_is_prob`` means output 0);
    ``class_outputs``: indices of class-score outputs (KL; None: every N x C output), the rest are
    matched by value.
    ``after_step``: called after every optimizer step (e.g. re-applying pruning masks).
    ``dist``: the data-parallel context (default: from ``torch.distributed`` if initialised).
    Checkpoints: best validation top-1 with labels; without, the closest to the teacher on
    validation (:func:`fidelity_module`'s ``error``: top-1 agreement for class scores, ``rel_l2``
    for other outputs).
    """
    import torch
    import torch.nn.functional as F

    from .config import resolve_objective
    from .distill import outputs_distill_loss, regression_distill_loss

    config = config or TrainConfig()
    data = load_dataset(data)
    objective = resolve_objective(config.objective, data.labeled, teacher is not None)
    if objective == "both" and config.distill_alpha <= 0:
        objective = "labels"
    probs = set(prob_outputs) | ({0} if output_is_prob else set())
    dist = dist or DistContext.current()
    device = resolve_device(config.device)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    try:
        module.to(device)
        if teacher is not None:
            teacher.to(device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        train_model = module
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP
            train_model = DDP(module, device_ids=None if device == "cpu" else [torch.cuda.current_device()])
        opt = make_optimizer(module.parameters(), config)
        trainable = [p for p in module.parameters() if p.requires_grad]
        n_batches = _n_train_batches(data, config, dist)
        by_labels = data.labeled

        def validate() -> dict[str, Any]:
            if by_labels:
                return evaluate_module(module, data, "val", batch_size=config.eval_batch_size, device=device,
                                       output_is_prob=output_is_prob)
            return fidelity_module(module, teacher, data, "val", config.eval_batch_size, device=device,
                                   n_outputs=n_outputs, classes=class_outputs)

        def better(v: dict, best: dict) -> bool:
            if by_labels:
                return v["top1"] > best["top1"] or (v["top1"] == best["top1"] and v["loss"] < best["loss"])
            return (v["error"], v["rel_l2"]) < (best["error"], best["rel_l2"])

        initial = validate()
        best, best_epoch = initial, 0
        best_state = _snapshot(module)
        epochs: list[dict[str, Any]] = []
        bar = _Progress(progress and dist.is_main, config.epochs * max(n_batches, 1), description)
        bar.info(_val_text(initial))
        try:
            for epoch in range(config.epochs):
                module.train()
                loss_sum, seen, correct, lr = 0.0, 0, 0, config.lr
                for i, (x, y) in enumerate(_train_batches(data, config, epoch, dist)):
                    lr = lr_at(config, epoch + i / max(n_batches, 1))
                    for g in opt.param_groups:
                        g["lr"] = lr
                    xs = as_tensors(x, device)
                    s_outs = outputs_of(train_model(*xs))
                    k = n_outputs or len(s_outs)
                    loss = None
                    if objective in ("labels", "both"):
                        yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
                        logits = _scores(logits_of(s_outs[0]), output_is_prob)
                        loss = F.cross_entropy(logits, yt, label_smoothing=float(config.label_smoothing))
                        correct += int((logits.detach().argmax(1) == yt).sum())
                    if objective in ("distill", "both"):
                        with torch.no_grad():
                            t_outs = outputs_of(teacher(*xs))
                        kd = outputs_distill_loss(s_outs[:k], t_outs[:k], temperature=config.distill_temperature,
                                                  probs=probs, classes=class_outputs)
                        if len(s_outs) > k:
                            kd = kd + torch.stack([regression_distill_loss(a, b)
                                                   for a, b in zip(s_outs[k:], t_outs[k:])]).mean()
                        loss = kd if loss is None else (1.0 - config.distill_alpha) * loss + config.distill_alpha * kd
                    if not torch.isfinite(loss):
                        raise OnnxPruneError(f"training diverged (loss {float(loss.detach())}) at epoch {epoch + 1}, "
                                             f"batch {i + 1}; lower the learning rate (now {config.lr:g})")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                    opt.step()
                    if after_step is not None:
                        after_step()
                    nb = len(xs[0])
                    loss_sum += float(loss.detach()) * nb
                    seen += nb
                    bar.advance(f"epoch {epoch + 1}/{config.epochs} loss {loss_sum / seen:.4f}")
                val = validate()
                entry = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1)}
                if by_labels:
                    entry.update(train_top1=correct / max(seen, 1) if objective != "distill" else None,
                                 val_loss=val["loss"], val_top1=val["top1"])
                else:
                    entry.update(val_rel_l2=val["rel_l2"], val_top1_agreement=val["top1_agreement"])
                epochs.append(entry)
                if better(val, best):
                    best, best_epoch = val, epoch + 1
                    best_state = _snapshot(module)
                bar.info(f"epoch {epoch + 1}/{config.epochs} loss {entry['train_loss']:.4f} "
                         f"{_val_text(val)} (best {_val_text(best)} @ {best_epoch})")
        finally:
            bar.close()
        module.load_state_dict(best_state)
        if after_step is not None:
            after_step()
        module.eval()
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    out = {"config": config.to_dict(), "objective": objective, "selection": "val_top1" if by_labels else "val_fidelity",
           "device": device, "world_size": dist.world_size, "epochs": epochs, "best_epoch": best_epoch,
           "train_batches_per_epoch": n_batches, "seconds": round(time.perf_counter() - t0, 3)}
    if by_labels:
        out.update(initial_val_top1=initial["top1"], initial_val_loss=initial["loss"], best_val_top1=best["top1"])
    else:
        out.update(initial_val_rel_l2=initial["rel_l2"], best_val_rel_l2=best["rel_l2"],
                   initial_val_top1_agreement=initial["top1_agreement"], best_val_top1_agreement=best["top1_agreement"])
    return out


def _val_text(v: dict) -> str:
    if "top1" in v:
        return f"val {v['top1']:.2%}"
    agree = f" agreement {v['top1_agreement']:.2%}" if v.get("top1_agreement") is not None else ""
    return f"val rel_l2 {v['rel_l2']:.4f}{agree}"


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
