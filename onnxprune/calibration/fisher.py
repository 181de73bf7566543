"""Label-free mask gradients for ``--criterion fisher`` (Kwon et al. 2022, "A Fast Post-Training
Pruning Framework for Transformers"), through the ONNX -> torch bridge.

Kwon et al. put a mask variable on every head's output and every FFN column and score each by the
Fisher information of its mask, ``sum over samples of (dL/dm)^2``, with ``L`` the task loss. Without
labels, ``L`` is the output's distance to the dense output, ``1/2 ||y(m) - y_dense||^2``: at ``m = 1``
its gradient is zero, and its Hessian (Gauss-Newton, exact at ``m = 1``) is ``J^T J`` with
``J = dy/dm``; a channel's diagonal entry ``||J e_c||^2`` is the output change its removal makes, to
second order. It is estimated without one backward pass per output element: with a fresh
``r ~ N(0, I)`` per sample, ``E[(r . J e_c)^2] = ||J e_c||^2`` (the Fisher of a Gaussian output model
with labels drawn from the model itself), so each batch contributes the square of
``d(sum_i r_i . y_i)/dm_c`` (cross-sample terms vanish in expectation).

No mask is inserted in the graph: a mask on the input channels of a linear consumer (``Y = X W``,
a Conv) has the gradient ``dL/dm_j = sum over W's other axes of W * dL/dW`` along the input axis,
so the weights' gradients give every group's mask gradient at once. Positions of padding tokens
(the attention mask) get no projection in per-token outputs.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from ..core.errors import OnnxPruneError

#: samples per forward pass (each sample gets its own random projection)
BATCH = 8
#: random projections in all at least (several per batch when there are few batches): the estimate's
#: noise falls as 1 / sqrt(draws)
DRAWS = 64


def mask_gradients(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], weights: Mapping[str, int], *,
                   mask: str | None = None, batch: int = BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    """Per weight in ``weights`` (name -> input-channel axis), the mask gradient of each input
    position on every batch: ``[batches, positions]`` (float64). Weights the bridge does not train
    (shared shape constants ...) are left out."""
    import torch  # lazy: torch ([train] extra)
    from ..bridge import to_torch  # lazy: the bridge imports torch

    module = to_torch(model)
    module.eval()
    params = {}
    for name, axis in weights.items():
        if name in module.trainable_names:
            params[name] = (module.param(name), axis)
    if not params:
        raise OnnxPruneError("criterion fisher: no prunable group is read by a weight the bridge can differentiate")
    n = len(next(iter(inputs.values())))
    if n == 0:
        raise OnnxPruneError("criterion fisher: no calibration samples")
    gen = torch.Generator().manual_seed(int(seed))
    batch = max(1, int(batch))
    projections = max(1, -(-DRAWS // -(-n // batch)))  # per batch, so that a few samples still give DRAWS draws
    rows: dict[str, list[np.ndarray]] = {k: [] for k in params}
    for start in range(0, n, batch):
        feeds = {k: torch.from_numpy(np.ascontiguousarray(v[start:start + batch])) for k, v in inputs.items()}
        outs = module.run(feeds)
        ys = [outs[name] for name in module.output_names if torch.is_floating_point(outs[name])]
        if not ys:
            raise OnnxPruneError("criterion fisher: the model has no float output to measure the distance on")
        tokens = feeds[mask].to(ys[0].dtype) if mask else None
        for k in range(projections):
            loss = sum((_projection(y, tokens, gen) * y).sum() for y in ys)
            grads = torch.autograd.grad(loss, [p for p, _ in params.values()], allow_unused=True,
                                        retain_graph=k + 1 < projections)
            for (name, (p, axis)), g in zip(params.items(), grads):
                if g is None:
                    rows[name].append(np.zeros(p.shape[axis]))
                    continue
                prod = (p.detach() * g.detach()).double()
                rows[name].append(prod.sum(dim=[d for d in range(prod.dim()) if d != axis]).numpy())
    return {k: np.stack(v) for k, v in rows.items()}


def _projection(y, tokens, gen):
    """A fresh ``N(0, I)`` direction of ``y``'s shape, zero at padding positions of per-token outputs."""
    import torch  # lazy: torch ([train] extra)

    r = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    if tokens is not None and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(tokens.shape):
        r = r * tokens.reshape(*tokens.shape, *([1] * (y.dim() - 2)))  # padding positions count nowhere
    return r
