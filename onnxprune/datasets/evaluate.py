"""Accuracy of an ONNX model with ONNX Runtime: what will be deployed, not the torch bridge."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..core.errors import OnnxPruneError
from .core import DatasetSplits, load_dataset
from ..core.runtime import CPU, open_session


def topk_correct(logits: np.ndarray, y: np.ndarray, k: int) -> int:
    """How many rows of ``logits`` have their label among the ``k`` largest scores."""
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties: the lower class index first, as argmax
    return int(np.any(top == y[:, None], axis=1).sum())


def _session(model_or_path: "str | os.PathLike | onnx.ModelProto", providers: Sequence[str] | None):
    return open_session(model_or_path, providers=list(providers or CPU))


_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def evaluate_onnx(model_or_path: "str | os.PathLike | onnx.ModelProto", data: "str | Mapping | DatasetSplits",
                  split: str = "test", batch_size: int = 256, *, providers: Sequence[str] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Top-1 (and top-5 when the model scores more than 5 classes) accuracy on ``split``.

    Runs the ONNX file itself in ONNX Runtime (CPU unless ``providers`` says otherwise). The model's
    first input receives the (preprocessed) images, its first output must be N x classes scores
    (logits or probabilities; trailing 1-sized dims are squeezed). A model with a fixed batch size
    is fed batches of exactly that size (the last one padded). Returns
    ``{"top1": fraction, "top5": fraction or None, "samples": N, "split": split}``.
    """
    ds = load_dataset(data, seed=seed)
    part = ds.split(split)
    if batch_size <= 0:
        raise OnnxPruneError(f"batch size must be positive, got {batch_size}")
    sess = _session(model_or_path, providers)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise OnnxPruneError(f"eval supports models with one input; this one has {len(inputs)} "
                             f"({', '.join(i.name for i in inputs)})")
    inp = inputs[0]
    dtype = _ORT_NP.get(inp.type)
    if dtype is None:
        raise OnnxPruneError(f"input {inp.name!r} is {inp.type}; eval feeds float images")
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    want_rank = len(inp.shape) if inp.shape is not None else None
    bs = fixed or batch_size
    n = correct1 = correct5 = 0
    classes = None
    if not ds.labeled:
        raise OnnxPruneError(f"data {ds.spec!r} has no labels: accuracy needs labels (score fidelity against the "
                             "dense model with --reference instead)")
    for x, y in part.batches(bs):
        if isinstance(x, Mapping):  # data bound to the model's inputs: the one input's array
            x = next(iter(x.values()))
        if want_rank is not None and x.ndim != want_rank:
            raise OnnxPruneError(f"data {ds.spec!r} gives {x.ndim}-D batches {list(x.shape)} but input {inp.name!r} "
                                 f"is {want_rank}-D {inp.shape}")
        want = list(inp.shape[1:]) if inp.shape is not None else []
        if any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, x.shape[1:])):
            raise OnnxPruneError(f"model input {inp.name!r} expects samples of shape {want} but data {ds.spec!r} gives "
                                 f"{list(x.shape[1:])} (adjust resize=/layout= in the spec)")
        real = len(x)
        if fixed and real < fixed:
            x = np.concatenate([x, np.zeros((fixed - real,) + x.shape[1:], x.dtype)])
        try:
            out = sess.run([sess.get_outputs()[0].name], {inp.name: x.astype(dtype, copy=False)})[0]
        except Exception as exc:  # noqa: BLE001 - shape mismatches etc. from ORT
            raise OnnxPruneError(f"ONNX Runtime failed on a batch of shape {list(x.shape)} from {ds.spec!r}: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        out = np.asarray(out, dtype=np.float32)[:real]
        out = out.reshape(real, -1) if out.ndim > 2 and all(d == 1 for d in out.shape[2:]) else out
        if out.ndim != 2:
            raise OnnxPruneError(f"model output has shape {list(out.shape)}; eval needs N x classes scores")
        classes = out.shape[1]
        if y.size and int(y.max()) >= classes:
            raise OnnxPruneError(f"label {int(y.max())} but the model scores only {classes} classes")
        correct1 += topk_correct(out, y, 1)
        if classes > 5:
            correct5 += topk_correct(out, y, 5)
        n += real
    if n == 0:
        raise OnnxPruneError(f"dataset {ds.spec!r} has no samples in its {split} split")
    return {"top1": correct1 / n, "top5": (correct5 / n) if classes and classes > 5 else None,
            "samples": n, "split": split}
