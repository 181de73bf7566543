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
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..datasets import DatasetSplits, load_dataset
from ..core.errors import OnnxPruneError, UnavailableError
from .config import TrainConfig, FM_STEPS_PER_EPOCH, resolve_objective
from .schedules import lr_at
from ..datasets.fidelity import nn_agreement
from .distill import legacy_kinds, outputs_distill_loss, shape_scale
from .augment import BatchAugment, input_signature, resolve_augment
from ..core.progress import ProgressBar


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
        import torch.distributed as dist  # lazy: torch ([train] extra)

        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()


def resolve_device(name: str) -> str:
    import torch  # lazy: torch ([train] extra)

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
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


def as_tensors(x: Any, device: str) -> list:
    """One batch (an array, or a dict of per-input arrays in graph-input order) as input tensors."""
    import torch  # lazy: torch ([train] extra)

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
    import torch  # lazy: torch ([train] extra)
    import torch.nn.functional as F  # lazy: torch ([train] extra)

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
                    classes: "Sequence[int] | None" = None, kinds: "Sequence[str] | None" = None,
                    probs: Sequence[int] = ()) -> dict[str, Any]:
    """How closely ``module`` follows ``teacher`` on a split (no labels needed), streaming.

    Per graph output, by its kind (``kinds``; None: :func:`~onnxprune.training.distill.legacy_kinds`
    from ``probs``/``classes``): ``rel_l2`` (``||s - t|| / ||t||`` over the split) always;
    ``top1_agreement`` (arg-max over axis 1) for scores/probs; ``mean_cosine`` and ``nn_agreement``
    for embeddings. ``errors`` holds each output's error in its own unit (``1 - top1_agreement``,
    ``1 - mean_cosine``, ``rel_l2``): they are never averaged with each other (see :func:`selection_score`).
    ``rel_l2`` is the mean relative L2 error over all outputs (one unit)."""
    import torch  # lazy: torch ([train] extra)


    part = data.split(split)
    was_training = module.training
    module.eval()
    num: list[float] = []
    den: list[float] = []
    agree: list[int] = []
    cos: list[float] = []
    rows: list[int] = []
    emb: dict[int, tuple[list, list]] = {}
    n = 0
    with torch.no_grad():
        for x, _ in part.batches(batch_size):
            xs = as_tensors(x, device)
            so, to = outputs_of(module(*xs)), outputs_of(teacher(*xs))
            so, to = so[:n_outputs or len(so)], to[:n_outputs or len(to)]
            if not num:
                num, den, agree, cos, rows = ([0.0] * len(so), [0.0] * len(so), [0] * len(so), [0.0] * len(so),
                                              [0] * len(so))
                kinds = list(kinds) if kinds is not None else legacy_kinds(to, probs, classes)
                emb = {i: ([], []) for i, k in enumerate(kinds) if k == "embedding"}
            for i, (a, b) in enumerate(zip(so, to)):
                a64, b64 = a.double(), b.double()
                num[i] += float(((a64 - b64) ** 2).sum())
                den[i] += float((b64 ** 2).sum())
                if kinds[i] in ("scores", "probs") and a.dim() >= 2:
                    agree[i] += int((a.argmax(1) == b.argmax(1)).sum())
                    rows[i] += a.numel() // a.shape[1]
                elif kinds[i] == "embedding":
                    fa, fb = a64.reshape(-1, a.shape[-1]), b64.reshape(-1, b.shape[-1])
                    cos[i] += float(torch.nn.functional.cosine_similarity(fa, fb, dim=1, eps=1e-12).sum())
                    rows[i] += len(fa)
                    if sum(len(e) for e in emb[i][0]) < 4096:
                        emb[i][0].append(b64.reshape(len(b), -1).cpu().numpy())
                        emb[i][1].append(a64.reshape(len(a), -1).cpu().numpy())
            n += len(xs[0])
    module.train(was_training)
    rel = [(a ** 0.5) / (b ** 0.5) if b > 0 else (0.0 if a == 0 else math.inf) for a, b in zip(num, den)]
    per: list[dict[str, Any]] = []
    for i, k in enumerate(kinds if num else []):
        d: dict[str, Any] = {"kind": k, "rel_l2": rel[i]}
        if k in ("scores", "probs") and rows[i]:
            d["top1_agreement"] = agree[i] / rows[i]
            d["error"] = 1.0 - d["top1_agreement"]
        elif k == "embedding" and rows[i]:
            d["mean_cosine"] = cos[i] / rows[i]
            d["error"] = 1.0 - d["mean_cosine"]
            nn = nn_agreement(np.concatenate(emb[i][0]), np.concatenate(emb[i][1]))
            if nn is not None:
                d["nn_agreement"] = nn
        else:
            d["error"] = rel[i]
        per.append(d)
    scored = [d["top1_agreement"] for d in per if "top1_agreement" in d]
    cosines = [d["mean_cosine"] for d in per if "mean_cosine" in d]
    return {"rel_l2": float(np.mean(rel)) if rel else 0.0, "errors": [d["error"] for d in per],
            "top1_agreement": float(np.mean(scored)) if scored else None,
            "mean_cosine": float(np.mean(cosines)) if cosines else None,
            "per_output_rel_l2": rel, "per_output": per, "samples": n}


def selection_score(errors: Sequence[float], initial: Sequence[float]) -> float:
    """One unit-free number to pick a checkpoint by over outputs of different kinds: each output's
    error as a fraction of its error at the start (+1e-3 so a perfect start is no division by 0),
    averaged. An agreement is never averaged with a relative error, only with its own improvement."""
    if not errors:
        return 0.0
    return float(np.mean([(e + 1e-3) / (e0 + 1e-3) for e, e0 in zip(errors, initial)]))


def teacher_channel_scales(teacher, data: DatasetSplits, kinds: Sequence[str], *, batch_size: int = 256,
                           device: str = "cpu", max_batches: int = 32) -> list:
    """Per output of kind ``value``: the teacher's standard deviation per channel (axis 1) on the
    training data (float64, centred: Chan's parallel update), at most ``max_batches`` batches;
    None for other kinds. The distillation loss divides each channel by it."""
    import torch  # lazy: torch ([train] extra)

    need = [i for i, k in enumerate(kinds) if k == "value"]
    if not need:
        return [None] * len(kinds)
    stats: dict[int, tuple] = {}
    with torch.no_grad():
        for b, (x, _) in enumerate(data.split("train").batches(batch_size)):
            if b >= max_batches:
                break
            to = outputs_of(teacher(*as_tensors(x, device)))
            for i in need:
                if i >= len(to) or not to[i].is_floating_point():
                    continue
                t = to[i].double()
                flat = t.reshape(-1, 1) if t.dim() < 2 else t.movedim(1, -1).reshape(-1, t.shape[1])
                cnt, mean = flat.shape[0], flat.mean(0)
                m2 = ((flat - mean) ** 2).sum(0)
                if i in stats:
                    c0, mu0, s0 = stats[i]
                    tot = c0 + cnt
                    delta = mean - mu0
                    stats[i] = (tot, mu0 + delta * cnt / tot, s0 + m2 + delta ** 2 * c0 * cnt / tot)
                else:
                    stats[i] = (cnt, mean, m2)
    out: list = [None] * len(kinds)
    for i, (cnt, _, m2) in stats.items():
        out[i] = torch.sqrt(m2 / max(cnt - 1, 1))
    return out


def _scores(logits, output_is_prob: bool):
    """Log-probabilities when the model outputs probabilities (a final Softmax), raw logits otherwise."""
    if not output_is_prob:
        return logits
    import torch  # lazy: torch ([train] extra)
    return torch.log(logits.clamp_min(1e-12))


def _train_batches(data: DatasetSplits, config: TrainConfig, epoch: int, dist: DistContext) -> Iterator:
    part = data.split("train")
    bs = max(1, config.batch_size // dist.world_size)
    seed = config.seed * 100003 + epoch
    if part.in_memory:
        if dist.active:
            from torch.utils.data import DistributedSampler  # lazy: torch ([train] extra)
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
    import torch  # lazy: torch ([train] extra)

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
                 n_outputs: int | None = None, class_outputs: Sequence[int] | None = None,
                 output_kinds: Sequence[str] | None = None, feature_loss: Any = None) -> dict[str, Any]:
    """Train ``module`` in place with ``config``; load the best-on-validation weights; return the history.

    ``teacher``: a module distilled into ``module`` (``config.objective``, ``config.distill_alpha``):
    every graph output is matched by its kind (``output_kinds``, one per graph output:
    :func:`~onnxprune.training.distill.kind_loss`; None: ``prob_outputs`` are probabilities,
    ``class_outputs`` (None: every N x C output) class scores, the rest values); outputs past
    ``n_outputs`` are intermediate features (``--distill-features``), matched by ``feature_loss``
    (a :class:`~onnxprune.training.features.FeatureMatch`; None: as values) and weighed by
    ``config.feature_weight``. Values are divided per channel by the teacher's std on the training data.
    ``output_is_prob`` means output 0 is probabilities.
    Function matching: with objective ``distill`` and ``config.augment`` not ``none``, every batch is
    augmented (:mod:`onnxprune.training.augment`) and teacher and student both see it; the run is
    sized in steps (see :class:`~onnxprune.training.config.TrainConfig`).
    ``after_step``: called after every optimizer step (e.g. re-applying pruning masks).
    ``dist``: the data-parallel context (default: from ``torch.distributed`` if initialised).
    Checkpoints: best validation top-1 with labels; without, the closest to the teacher on the
    validation split, never augmented (:func:`selection_score` over :func:`fidelity_module`'s
    per-output errors). ``best_step`` and ``best_val`` say which step was kept and its figures.
    """
    import torch  # lazy: torch ([train] extra)
    import torch.nn.functional as F  # lazy: torch ([train] extra)


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
    first_x = next(iter(data.split("train").batches(2)), (None, None))[0]
    signature = input_signature(list(first_x.values()) if isinstance(first_x, Mapping) else [first_x]) \
        if first_x is not None else []
    aug_ops = _augment_ops(config.augment, objective, signature)
    fm = objective == "distill" and bool(aug_ops)
    augment = BatchAugment(aug_ops, seed=config.seed)
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
            from torch.nn.parallel import DistributedDataParallel as DDP  # lazy: torch ([train] extra)
            train_model = DDP(module, device_ids=None if device == "cpu" else [torch.cuda.current_device()])
        opt = make_optimizer(module.parameters(), config)
        trainable = [p for p in module.parameters() if p.requires_grad]
        n_batches = _n_train_batches(data, config, dist)
        by_labels = data.labeled
        # the run, in optimizer steps: an epoch is a pass over the data, or with function matching at
        # least FM_STEPS_PER_EPOCH steps of augmented views; --steps sizes it directly
        per_epoch = max(n_batches, FM_STEPS_PER_EPOCH) if fm and n_batches else n_batches
        total = config.steps if config.steps > 0 else (config.epochs * per_epoch if per_epoch else 0)
        eval_every = per_epoch if config.steps == 0 else max(1, math.ceil(total / 20))
        unit = per_epoch or 1
        total_epochs = total / unit if total else float(config.epochs)
        warmup = config.warmup_epochs if config.warmup_epochs > 0 else (0.05 * total_epochs if fm else 0.0)

        kinds: list[str] | None = None
        scales: list | None = None

        def validate() -> dict[str, Any]:
            if by_labels:
                return evaluate_module(module, data, "val", batch_size=config.eval_batch_size, device=device,
                                       output_is_prob=output_is_prob)
            return fidelity_module(module, teacher, data, "val", config.eval_batch_size, device=device,
                                   n_outputs=n_outputs, classes=class_outputs, probs=tuple(probs),
                                   kinds=None if output_kinds is None else list(output_kinds)[:n_outputs or None])

        initial = validate()

        def better(v: dict, best: dict) -> bool:
            if by_labels:
                return v["top1"] > best["top1"] or (v["top1"] == best["top1"] and v["loss"] < best["loss"])
            return ((selection_score(v["errors"], initial["errors"]), v["rel_l2"])
                    < (selection_score(best["errors"], initial["errors"]), best["rel_l2"]))

        best, best_step = initial, 0
        best_state = _snapshot(module)
        epochs: list[dict[str, Any]] = []
        bar = ProgressBar(total or config.epochs * max(n_batches, 1), description, enabled=progress and dist.is_main,
                          tty_only=True).start()
        bar.info(_val_text(initial))
        step, loss_sum, seen, correct, lr = 0, 0.0, 0, 0, config.lr

        def record(epoch_mark: float) -> None:
            nonlocal best, best_step, best_state, loss_sum, seen, correct
            val = validate()
            entry = {"epoch": round(epoch_mark, 3) if epoch_mark % 1 else int(epoch_mark), "step": step, "lr": lr,
                     "train_loss": loss_sum / max(seen, 1)}
            if by_labels:
                entry.update(train_top1=correct / max(seen, 1) if objective != "distill" else None,
                             val_loss=val["loss"], val_top1=val["top1"])
            else:
                entry.update(val_rel_l2=val["rel_l2"], val_top1_agreement=val["top1_agreement"],
                             val_mean_cosine=val["mean_cosine"])
            epochs.append(entry)
            if better(val, best):
                best, best_step = val, step
                best_state = _snapshot(module)
            bar.info(f"step {step}/{total or '?'} loss {entry['train_loss']:.4f} {_val_text(val)} "
                     f"(best {_val_text(best)} @ step {best_step})")
            loss_sum, seen, correct = 0.0, 0, 0

        try:
            for epoch in range(10 ** 9):
                if (total and step >= total) or (not total and epoch >= config.epochs):
                    break
                module.train()
                for x, y in _train_batches(data, config, epoch, dist):
                    if total and step >= total:
                        break
                    lr = lr_at(config, step / unit, total_epochs, warmup)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    xs = augment(as_tensors(x, device))
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
                        if kinds is None:
                            head = (list(output_kinds)[:k] if output_kinds is not None
                                    else legacy_kinds(t_outs[:k], probs, class_outputs))
                            kinds = head + ["value"] * (0 if feature_loss is not None else len(t_outs) - k)
                            raw = teacher_channel_scales(teacher, data, kinds, batch_size=config.eval_batch_size,
                                                         device=device)
                            scales = [None if r is None else shape_scale(r, t) for r, t in zip(raw, t_outs)]
                            if feature_loss is not None and len(t_outs) > k:
                                feature_loss.prepare(teacher, data, k, batch_size=config.eval_batch_size, device=device)
                        loss_kd = outputs_distill_loss(s_outs[:k], t_outs[:k], temperature=config.distill_temperature,
                                                       kinds=kinds[:k], scales=scales[:k])
                        if len(s_outs) > k:
                            feats = (feature_loss(s_outs[k:], t_outs[k:], xs) if feature_loss is not None else
                                     outputs_distill_loss(s_outs[k:], t_outs[k:], kinds=kinds[k:], scales=scales[k:]))
                            loss_kd = loss_kd + config.feature_weight * feats
                        loss = loss_kd if loss is None else ((1.0 - config.distill_alpha) * loss
                                                             + config.distill_alpha * loss_kd)
                    if not torch.isfinite(loss):
                        raise OnnxPruneError(f"training diverged (loss {float(loss.detach())}) at step {step + 1} "
                                             f"(epoch {epoch + 1}); lower the learning rate (now {config.lr:g})")
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
                    step += 1
                    bar.advance(info=f"step {step}/{total or '?'} loss {loss_sum / max(seen, 1):.4f}")
                    if total and (step % eval_every == 0 or step == total):
                        record(step / unit)
                        module.train()
                if not total:  # a loader of unknown length: one evaluation per pass
                    record(epoch + 1)
        finally:
            bar.close()
        module.load_state_dict(best_state)
        if after_step is not None:
            after_step()
        module.eval()
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    best_epoch = next((e["epoch"] for e in epochs if e["step"] == best_step), 0) if best_step else 0
    out = {"config": config.to_dict(), "objective": objective, "selection": "val_top1" if by_labels else "val_fidelity",
           "device": device, "world_size": dist.world_size, "epochs": epochs, "best_epoch": best_epoch,
           "best_step": best_step, "steps": step, "steps_per_epoch": per_epoch, "warmup_epochs": warmup,
           "function_matching": fm, "augment": list(aug_ops),
           "train_batches_per_epoch": n_batches, "seconds": round(time.perf_counter() - t0, 3)}
    if by_labels:
        out.update(initial_val_top1=initial["top1"], initial_val_loss=initial["loss"], best_val_top1=best["top1"])
    else:
        out.update(initial_val_rel_l2=initial["rel_l2"], best_val_rel_l2=best["rel_l2"],
                   initial_val_top1_agreement=initial["top1_agreement"], best_val_top1_agreement=best["top1_agreement"],
                   initial_val=initial["per_output"], best_val=best["per_output"])
    return out


def _augment_ops(spec: str, objective: str, signature: list) -> tuple[str, ...]:
    """Function matching's ops for label-free distillation; with labels ``auto`` means none (a
    mixed sample has no one label) and an explicit list may not mix."""

    if objective == "distill":
        return resolve_augment(spec, signature)
    if spec.strip().lower() in ("auto", "none"):
        return ()
    ops = resolve_augment(spec, signature)
    if "mixup" in ops:
        raise OnnxPruneError(f"--augment {spec}: mixup blends samples, and a blended sample has no one label; it goes "
                             "with label-free distillation (objective distill) only")
    return ops


def _val_text(v: dict) -> str:
    if "top1" in v:
        return f"val {v['top1']:.2%}"
    agree = f" agreement {v['top1_agreement']:.2%}" if v.get("top1_agreement") is not None else ""
    cos = f" cosine {v['mean_cosine']:.4f}" if v.get("mean_cosine") is not None else ""
    return f"val rel_l2 {v['rel_l2']:.4f}{agree}{cos}"


def _snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
