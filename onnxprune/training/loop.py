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
from typing import Any, Callable, Iterator, Mapping

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
            xt, yt = torch.from_numpy(np.ascontiguousarray(x)).to(device), torch.from_numpy(y).to(device)
            logits = _scores(logits_of(module(xt)), output_is_prob)
            loss_sum += float(F.cross_entropy(logits, yt, reduction="sum"))
            correct += int((logits.argmax(1) == yt).sum())
            n += len(y)
    module.train(was_training)
    return {"top1": correct / max(n, 1), "loss": loss_sum / max(n, 1), "samples": n}


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
                 description: str = "retrain") -> dict[str, Any]:
    """Train ``module`` in place with ``config``; load the best-on-validation weights; return the history.

    ``teacher``: a module whose logits are distilled into ``module`` (``config.distill_alpha``).
    ``after_step``: called after every optimizer step (e.g. re-applying pruning masks).
    ``dist``: the data-parallel context (default: from ``torch.distributed`` if initialised).
    """
    import torch

    config = config or TrainConfig()
    data = load_dataset(data)
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
        ev_kwargs = dict(batch_size=config.eval_batch_size, device=device, output_is_prob=output_is_prob)
        initial = evaluate_module(module, data, "val", **ev_kwargs)
        best_top1, best_loss, best_epoch = initial["top1"], initial["loss"], 0
        best_state = _snapshot(module)
        epochs: list[dict[str, Any]] = []
        bar = _Progress(progress and dist.is_main, config.epochs * max(n_batches, 1), description)
        bar.info(f"val {initial['top1']:.2%}")
        use_teacher = teacher is not None and config.distill_alpha > 0
        try:
            for epoch in range(config.epochs):
                module.train()
                loss_sum, seen, correct, lr = 0.0, 0, 0, config.lr
                for i, (x, y) in enumerate(_train_batches(data, config, epoch, dist)):
                    lr = lr_at(config, epoch + i / max(n_batches, 1))
                    for g in opt.param_groups:
                        g["lr"] = lr
                    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
                    yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
                    t_logits = None
                    if use_teacher:
                        with torch.no_grad():
                            t_logits = _scores(logits_of(teacher(xt)), output_is_prob)
                    logits = _scores(logits_of(train_model(xt)), output_is_prob)
                    from .distill import training_loss
                    loss = training_loss(logits, yt, teacher_logits=t_logits, alpha=config.distill_alpha,
                                         temperature=config.distill_temperature,
                                         label_smoothing=config.label_smoothing)
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
                    loss_sum += float(loss.detach()) * len(y)
                    correct += int((logits.detach().argmax(1) == yt).sum())
                    seen += len(y)
                    bar.advance(f"epoch {epoch + 1}/{config.epochs} loss {loss_sum / seen:.4f}")
                val = evaluate_module(module, data, "val", **ev_kwargs)
                entry = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(seen, 1),
                         "train_top1": correct / max(seen, 1), "val_loss": val["loss"], "val_top1": val["top1"]}
                epochs.append(entry)
                if val["top1"] > best_top1 or (val["top1"] == best_top1 and val["loss"] < best_loss):
                    best_top1, best_loss, best_epoch = val["top1"], val["loss"], epoch + 1
                    best_state = _snapshot(module)
                bar.info(f"epoch {epoch + 1}/{config.epochs} loss {entry['train_loss']:.4f} "
                         f"val {val['top1']:.2%} (best {best_top1:.2%} @ {best_epoch})")
        finally:
            bar.close()
        module.load_state_dict(best_state)
        if after_step is not None:
            after_step()
        module.eval()
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    return {"config": config.to_dict(), "device": device, "world_size": dist.world_size,
            "initial_val_top1": initial["top1"], "initial_val_loss": initial["loss"], "epochs": epochs,
            "best_epoch": best_epoch, "best_val_top1": best_top1, "train_batches_per_epoch": n_batches,
            "seconds": round(time.perf_counter() - t0, 3)}


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
