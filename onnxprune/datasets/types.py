"""The data types every data source returns: a split of samples and the train/val/test splits of
one data set. In their own module so that the loaders (``core`` for labeled data sets,
``unlabeled`` for input-only ones) share them without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from ..core.errors import OnnxPruneError
from .spec import ParsedSpec, Preprocess

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split: in-memory arrays ``x``/``y``, or an iterable of ``(x, y)`` batches (``loader``).

    ``x`` is one array, or a dict of arrays (one per model input, same first dimension); ``y`` is
    None for unlabeled data. Loader batches (numpy arrays or torch tensors) get ``transform`` applied
    as they are read.
    """

    x: "np.ndarray | dict[str, np.ndarray] | None" = None
    y: np.ndarray | None = None
    loader: Iterable | None = None
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def in_memory(self) -> bool:
        return self.x is not None

    def __len__(self) -> int:
        if self.x is not None:
            return int(len(first_array(self.x)))
        ds = getattr(self.loader, "dataset", None)
        try:
            return len(ds) if ds is not None else -1
        except TypeError:
            return -1

    def batches(self, batch_size: int = 256, *, shuffle: bool = False, seed: int = 0,
                indices: np.ndarray | None = None, drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(x, y)`` numpy batches. Arrays: ``indices`` (a shard) or all, optionally shuffled
        with ``seed``. Loaders: their own batches in their own order (``indices`` picks batch numbers)."""
        if self.x is not None:
            idx = np.arange(len(self)) if indices is None else np.asarray(indices)
            if shuffle:
                idx = np.random.default_rng(seed).permutation(idx)
            stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
            for i in range(0, stop, batch_size):
                b = idx[i:i + batch_size]
                if len(b):
                    yield take(self.x, b), (None if self.y is None else self.y[b])
            return
        keep = None if indices is None else set(int(i) for i in indices)
        for i, batch in enumerate(self.loader):
            if keep is not None and i not in keep:
                continue
            x, y = _batch_xy(batch)
            if self.transform is not None:
                x = self.transform(x)
            yield x, y


@dataclass
class DatasetSplits:
    """Train / val / test splits of one dataset, with what a model needs to know about them."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]  # per sample, as fed to the model (e.g. (1, 8, 8))
    spec: str = ""
    preprocess: Preprocess = field(default_factory=Preprocess)
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        """False for unlabeled data (``npz`` with only ``x`` or per-input arrays, ``images:``, arrays
        from ``python:``): only distillation, calibration and fidelity can use it."""
        return self.train.y is not None or self.train.loader is not None

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise OnnxPruneError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
        s = getattr(self, name)
        if s is None or (s.x is None and s.loader is None) or len(s) == 0:
            raise OnnxPruneError(f"dataset {self.spec or '(given)'} has no {name} split")
        return s

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (recorded with results)."""
        return {"spec": self.spec, "num_classes": self.num_classes, "labeled": self.labeled,
                "input_shape": list(self.input_shape),
                "samples": {k: len(getattr(self, k)) for k in SPLITS if getattr(self, k) is not None},
                "preprocess": self.preprocess.to_dict(), "seed": self.seed, "notes": list(self.notes)}


def first_array(x: "np.ndarray | Mapping[str, np.ndarray]") -> np.ndarray:
    """The array of single-input data, or the first of per-input data (for lengths and shapes)."""
    return next(iter(x.values())) if isinstance(x, Mapping) else x


def take(x: "np.ndarray | Mapping[str, np.ndarray]", idx: np.ndarray) -> "np.ndarray | dict[str, np.ndarray]":
    """Rows ``idx`` of one array or of every per-input array."""
    return {k: v[idx] for k, v in x.items()} if isinstance(x, Mapping) else x[idx]


def _existing(arg: str, parsed: ParsedSpec, *, want_dir: bool) -> Path:
    p = Path(arg).expanduser()
    if not p.exists():
        raise OnnxPruneError(f"data {parsed.text!r}: {p}: no such {'folder' if want_dir else 'file'}")
    if want_dir and not p.is_dir():
        raise OnnxPruneError(f"data {parsed.text!r}: {p} is not a folder")
    if not want_dir and p.is_dir():
        raise OnnxPruneError(f"data {parsed.text!r}: {p} is a folder, expected a file")
    return p


def _is_pair(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(hasattr(a, "shape") or isinstance(a, list) for a in v)


def _batch_xy(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(batch, Mapping):
        x = batch.get("x", batch.get("input", batch.get("image")))
        y = batch.get("y", batch.get("label", batch.get("target")))
    else:
        x, y = batch[0], batch[1]
    to_np = (lambda t: t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t))
    return np.asarray(to_np(x)), np.asarray(to_np(y)).astype(np.int64)
