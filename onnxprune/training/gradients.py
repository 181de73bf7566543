"""Loss gradients of every float initializer, through the bridge, for gradient-based importance.

Used by structured ``taylor`` (first-order Taylor, Molchanov et al. 2019: ``|sum(w * g)|`` per
channel) and unstructured ``magnitude_x_gradient`` (``|w * g|``). Both need the gradient of the
training loss with respect to each weight; it is averaged over a few training batches.
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np
import onnx

from ..datasets import DatasetSplits, load_dataset
from ..core.errors import OnnxPruneError
from .retrain import _as_model, check_bridge, outputs_probabilities, torch_module
from .loop import _scores, logits_of


def weight_gradients(model: "str | os.PathLike | onnx.ModelProto", data: "str | Mapping | DatasetSplits",
                     batches: int = 4, batch_size: int = 64, seed: int = 0, *,
                     check: bool = True) -> dict[str, np.ndarray]:
    """``{initializer name: mean signed gradient of the cross-entropy}`` over ``batches`` training batches.

    The batches are the first ``batches`` of the training split shuffled with ``seed`` (so the same
    call gives the same numbers). The module runs in eval mode (batch-norm statistics as in the file),
    the gradient of each batch's mean loss is averaged over the batches. Keys are the names of the
    initializers the bridge trains (weights, biases, norm scales/shifts; not batch-norm statistics or
    shape constants); arrays have the initializers' shapes (float32).
    """
    import torch  # lazy: torch ([train] extra)
    import torch.nn.functional as F  # lazy: torch ([train] extra)


    if batches <= 0 or batch_size <= 0:
        raise OnnxPruneError(f"gradients need positive batches and batch size, got {batches} x {batch_size}")
    m = _as_model(model)
    ds = load_dataset(data)  # the split is always seed 0: the same samples as eval and finetune
    if not ds.labeled:
        raise OnnxPruneError(f"gradient criteria need labels (the gradient of the cross-entropy); data {ds.spec!r} "
                             "has none")
    if check:
        check_bridge(m, ds)
    module = torch_module(m, train_bn=False)
    module.eval()
    params = {name: module.param(name) for name in module.trainable_names}
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    prob = outputs_probabilities(m)
    torch.manual_seed(seed)
    n = 0
    for x, y in ds.split("train").batches(batch_size, shuffle=True, seed=seed):
        module.zero_grad(set_to_none=True)
        logits = _scores(logits_of(module(torch.from_numpy(np.ascontiguousarray(x)))), prob)
        loss = F.cross_entropy(logits, torch.from_numpy(y))
        loss.backward()
        for k, p in params.items():
            if p.grad is not None:
                sums[k] += p.grad.detach()
        n += 1
        if n >= batches:
            break
    if n == 0:
        raise OnnxPruneError(f"dataset {ds.spec!r} has no training batches for gradients")
    return {k: (v / n).cpu().numpy().astype(np.float32) for k, v in sums.items()}
