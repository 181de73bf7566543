"""Trained weights back into the ONNX graph they came from, and sparsity masks kept during training.

:func:`write_back` changes tensor values only: node names, graph structure, opset, initializer names,
storage kind (dense, sparse, Constant node) and dtypes stay as they were, so the result diffs cleanly
against the input and every tool keyed on names keeps working. Masks (True = kept) from
unstructured or N:M pruning are re-applied on the way out, so the sparsity is exactly what pruning
left, whatever the optimizer did.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..core.errors import OnnxPruneError
from ..core.model_io import sparse_to_dense
from .module import OnnxModule


def apply_masks(module: OnnxModule, masks: Mapping[str, np.ndarray | torch.Tensor],
                optimizer: torch.optim.Optimizer | None = None) -> OnnxModule:
    """Keep the weights ``masks`` marks False at exactly zero during training.

    Zeroes them now, zeroes their gradients (hooks, so momentum never builds up there), and, given an
    ``optimizer``, re-zeroes them after each of its steps (weight decay). Without an optimizer, call
    ``module.enforce_masks()`` after each step. ``masks`` maps initializer names to bool arrays of the
    initializer's shape (e.g. ``onnxprune.sparsity.masks.masks_of(model)``).
    """
    module.set_masks(masks)
    if optimizer is not None:
        optimizer.register_step_post_hook(lambda *_: module.enforce_masks())
    return module


def write_back(model: onnx.ModelProto, module: OnnxModule,
               masks: Mapping[str, np.ndarray | torch.Tensor] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` holding ``module``'s current weights (and batch-norm statistics when they
    were trained), with the module's registered ``masks`` and any given here applied exactly."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dense = {t.name: t for t in out.graph.initializer}
    sparse = {t.values.name: t for t in out.graph.sparse_initializer}
    consts = {n.output[0]: n for n in out.graph.node if n.op_type == "Constant" and n.output}
    all_masks = {name: m.detach().cpu().numpy() for name, m in module.masks.items()}
    all_masks.update({name: (m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)).astype(bool)
                      for name, m in (masks or {}).items()})
    unknown = [n for n in module.initializer_names if n not in dense and n not in sparse and n not in consts]
    if unknown:
        raise OnnxPruneError(f"write_back: the module holds {unknown[0]!r}, which the model does not; "
                             "was the module built from this model?")
    for name, tensor in module.named_initializers():
        if not tensor.is_floating_point():
            continue  # shapes, indices: never trained
        value = tensor.detach().cpu()
        if name in all_masks:
            mask = torch.from_numpy(all_masks[name])
            if tuple(mask.shape) != tuple(value.shape):
                raise OnnxPruneError(f"write_back: mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(value.shape)}")
            value = value.masked_fill(~mask, 0)
        if name in dense:
            _set_dense(dense[name], value)
        elif name in sparse:
            _set_sparse(sparse[name], value)
        else:
            _set_constant(consts[name], value)
    return out


def _as_numpy(value: torch.Tensor, like: np.ndarray) -> np.ndarray:
    if tuple(value.shape) != like.shape:
        raise OnnxPruneError(f"write_back: shape {tuple(value.shape)} does not match the model's {like.shape}")
    return value.to(torch.float64 if like.dtype == np.float64 else torch.float32).numpy().astype(like.dtype)


def _set_dense(t: onnx.TensorProto, value: torch.Tensor) -> None:
    old = numpy_helper.to_array(t)
    new = _as_numpy(value, old)
    if np.array_equal(new, old, equal_nan=True):
        return  # untouched tensors keep their exact serialization
    repl = numpy_helper.from_array(new, t.name)
    repl.doc_string = t.doc_string
    t.CopyFrom(repl)


def _set_sparse(sp: onnx.SparseTensorProto, value: torch.Tensor) -> None:
    """Sparse initializers stay sparse: new nonzeros, indices in the original layout (flat or [nnz, rank])."""
    old = sparse_to_dense(sp)
    new = _as_numpy(value, old)
    if np.array_equal(new, old, equal_nan=True):
        return
    dims = tuple(sp.dims)
    flat = np.flatnonzero(new)
    old_idx = numpy_helper.to_array(sp.indices) if sp.HasField("indices") else np.zeros((0,), np.int64)
    idx = np.stack(np.unravel_index(flat, dims), axis=1).astype(np.int64) if old_idx.ndim == 2 else flat.astype(np.int64)
    values = numpy_helper.from_array(new.reshape(-1)[flat], sp.values.name)
    sp.values.CopyFrom(values)
    sp.indices.CopyFrom(numpy_helper.from_array(idx, sp.indices.name))


def _set_constant(node: onnx.NodeProto, value: torch.Tensor) -> None:
    """A Constant node keeps its attribute kind (``value`` tensor, ``value_float(s)``)."""
    for a in node.attribute:
        if a.name == "value":
            _set_dense(a.t, value)
        elif a.name == "value_float":
            a.f = float(value.reshape(()).item())
        elif a.name == "value_floats":
            del a.floats[:]
            a.floats.extend(float(v) for v in value.reshape(-1).tolist())
        elif a.name == "sparse_value":
            _set_sparse(a.sparse_tensor, value)
