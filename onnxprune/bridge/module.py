"""``OnnxModule``: an ``nn.Module`` that executes an ONNX graph node by node with the torch ops of
:mod:`onnxprune.bridge.ops`, so the graph can be fine-tuned with any torch optimizer and written back
(:func:`onnxprune.bridge.write_back`) into the very same ONNX graph.

Weights: every initializer (and every ``Constant`` node's value) becomes a parameter or a buffer,
registered under a torch-safe name and reachable by its ONNX name through :meth:`OnnxModule.param`.
A float tensor is a trainable :class:`torch.nn.Parameter` unless it is a fixed constant of the graph:
it feeds a slot that is not a weight (batch-norm running statistics, Resize scales, Clip bounds, Pow
exponents, Pad values, Range bounds), or it is a one-element constant of an elementwise op (the eps
of a decomposed LayerNorm, GELU's 0.5 and sqrt(2), HardSwish's 6), which training would only drift.
A one-element weight of a layer (the bias of a single-output Linear, a shared PRelu slope) still
trains. Integer and bool tensors (shapes, indices, axes) are buffers.
"""
from __future__ import annotations

import heapq
import re
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from ..core.errors import OnnxPruneError
from ..core.graph import opset_of
from ..core.shapes import graph_inputs
from ..core.model_io import sparse_to_dense
from . import ops

#: (op type -> input positions) that hold a layer's weights: trainable even when they hold one value.
WEIGHT_SLOTS: dict[str, set[int]] = {
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "Gemm": {0, 1, 2}, "MatMul": {0, 1}, "Einsum": set(range(16)),
    "BatchNormalization": {1, 2}, "InstanceNormalization": {1, 2}, "GroupNormalization": {1, 2},
    "LayerNormalization": {1, 2}, "RMSNormalization": {1}, "PRelu": {1},
    "LSTM": {1, 2, 3, 7}, "GRU": {1, 2, 3}, "RNN": {1, 2, 3},
}
#: (op type -> input positions) that are never trained, whatever their size.
FROZEN_SLOTS: dict[str, set[int]] = {
    "BatchNormalization": {3, 4}, "Resize": {1, 2, 3}, "Upsample": {1}, "Clip": {1, 2}, "Pow": {1},
    "Pad": {1, 2, 3}, "Range": {0, 1, 2}, "ConstantOfShape": {0}, "Dropout": {1, 2},
    "LSTM": {5, 6}, "GRU": {5}, "RNN": {5},  # initial states: inputs of the recurrence, not weights
}
#: BatchNormalization inputs that hold running statistics (written back when ``train_bn``).
BN_STAT_SLOTS = {3, 4}


class BridgeRuntimeError(OnnxPruneError):
    """A node failed while the module ran; names the node so the failing op is found at once."""

    def __init__(self, node: ops.Node, exc: BaseException):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        super().__init__(f"bridge: node {node.name} (op {node.op_type}) failed: {type(exc).__name__}: {first}")
        self.node = node.name
        self.op_type = node.op_type


def _safe_name(name: str, taken: set[str], module: nn.Module) -> str:
    """A torch attribute name for an ONNX tensor name (dots, colons, slashes ... become ``_``)."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "t"
    safe, i = base, 1
    while safe in taken or hasattr(module, safe):
        safe = f"{base}_{i}"
        i += 1
    taken.add(safe)
    return safe


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind in "OSU":
        raise OnnxPruneError("bridge: string tensors are not supported")
    if arr.dtype in (np.uint16, np.uint32, np.uint64):
        raise OnnxPruneError(f"bridge: tensors of type {arr.dtype} are not supported "
                             "(torch has no arithmetic for unsigned 16/32/64-bit integers)")
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    try:
        return torch.from_numpy(np.array(arr, copy=True))
    except TypeError as exc:
        raise OnnxPruneError(f"bridge: tensors of type {arr.dtype} are not supported") from exc


def _topological(nodes: Sequence[onnx.NodeProto], available: set[str]) -> list[int]:
    """Node indices in a valid execution order (file order where possible); unknown inputs are errors."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps: list[set[int]] = []
    users: dict[int, set[int]] = {}
    for i, n in enumerate(nodes):
        d = set()
        for name in n.input:
            if not name or name in available:
                continue
            if name not in producer:
                raise OnnxPruneError(f"bridge: input {name!r} of node {n.name} (op {n.op_type}) is never produced")
            d.add(producer[name])
        for p in d:  # a set: a node reading one producer twice (Mul(x, x)) is released once
            users.setdefault(p, set()).add(i)
        deps.append(d)
    ready = [i for i, d in enumerate(deps) if not d]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in sorted(users.get(i, ())):
            deps[j].discard(i)
            if not deps[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        done = set(order)
        stuck = next(nodes[i] for i in range(len(nodes)) if i not in done)
        raise OnnxPruneError(f"bridge: the graph has a cycle through node {stuck.name} (op {stuck.op_type})")
    return order


class OnnxModule(nn.Module):
    """Executes a (normalized) ONNX graph with torch; see the module docstring. Build with
    :func:`onnxprune.bridge.to_torch`.

    ``forward(*inputs)`` takes tensors in graph-input order and returns one tensor for a single-output
    graph, else a tuple in graph-output order. :meth:`run` returns every intermediate tensor by name.
    """

    def __init__(self, model: onnx.ModelProto, *, train_bn: bool = False):
        super().__init__()
        graph = model.graph
        self.opset = opset_of(model)
        self.train_bn = bool(train_bn)
        self.input_names: list[str] = [i.name for i in graph_inputs(model)]
        self.output_names: list[str] = [o.name for o in graph.output]
        self._flags = ops.RunFlags()

        arrays: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for sp in graph.sparse_initializer:
            arrays[sp.values.name] = sparse_to_dense(sp)
        for inp in graph_inputs(model):  # refuse what no op could compute with, before anything runs
            kind = inp.type.WhichOneof("value")
            if kind not in (None, "tensor_type"):
                raise OnnxPruneError(f"bridge: input {inp.name!r} is not a tensor (sequences, maps and optionals are not supported)")
            elem = inp.type.tensor_type.elem_type
            if elem:
                try:
                    ops.torch_dtype(elem)
                except OnnxPruneError as exc:
                    raise OnnxPruneError(f"bridge: input {inp.name!r}: {str(exc).removeprefix('bridge: ')}") from None
        available = set(self.input_names) | set(arrays)
        self._steps: list[tuple[ops.OpFn, ops.Node]] = []
        nodes = list(graph.node)
        for i in _topological(nodes, available):
            node = nodes[i]
            n = self._node(node, i)
            const_check = ops.CONST_CHECKS.get(node.op_type)
            if const_check is not None:
                const_check(n, arrays)
            if node.op_type == "Constant":
                arrays[node.output[0]] = ops.tensor_of_attr(n)
                continue
            self._steps.append((ops.TABLE[node.op_type], n))

        # which float tensors train: see the module docstring
        weight_use, frozen_use, self.bn_stat_names = set(), set(), set()
        for _, n in self._steps:
            for pos, name in enumerate(n.inputs):
                if pos in WEIGHT_SLOTS.get(n.op_type, ()):
                    weight_use.add(name)
                if pos in FROZEN_SLOTS.get(n.op_type, ()):
                    frozen_use.add(name)
                if n.op_type == "BatchNormalization" and pos in BN_STAT_SLOTS and name in arrays:
                    self.bn_stat_names.add(name)
        self.initializer_names: list[str] = list(arrays)
        self.trainable_names: list[str] = []
        self._attr: dict[str, str] = {}
        taken: set[str] = set()
        for name, arr in arrays.items():
            t = _to_tensor(arr)
            safe = _safe_name(name, taken, self)
            self._attr[name] = safe
            if t.is_floating_point() and name not in frozen_use and (name in weight_use or t.numel() > 1):
                self.register_parameter(safe, nn.Parameter(t))
                self.trainable_names.append(name)
            else:
                self.register_buffer(safe, t)
        self._masks: dict[str, str] = {}  # ONNX name -> mask buffer name

        # free every intermediate after its last use (graph outputs and stored tensors stay)
        last_use: dict[str, int] = {}
        for i, (_, n) in enumerate(self._steps):
            for name in n.inputs:
                if name:
                    last_use[name] = i
        keep = set(self.output_names) | set(arrays)
        self._free: list[list[str]] = [[] for _ in self._steps]
        for name, i in last_use.items():
            if name not in keep:
                self._free[i].append(name)

    def _node(self, node: onnx.NodeProto, index: int) -> ops.Node:
        name = node.name or f"{node.op_type}_{index}"  # unnamed nodes: as normalize names them
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops.TABLE:
            op_type = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            raise OnnxPruneError(f"bridge: op {op_type} (node {name}) is not supported")
        n = ops.Node(name=name, op_type=node.op_type, opset=self.opset, attrs=ops.onnx_attrs(node),
                     inputs=list(node.input), outputs=list(node.output), flags=self._flags)
        check = ops.CHECKS.get(node.op_type)
        if check is not None:
            check(n)
        return n

    @property
    def nodes(self) -> list[ops.Node]:
        """The executed nodes, in execution (topological) order; Constant nodes are stored tensors."""
        return [n for _, n in self._steps]

    # ------------------------------------------------------------------------------ weights

    def param(self, name: str) -> torch.Tensor:
        """The parameter (or buffer) holding initializer ``name``."""
        if name not in self._attr:
            raise KeyError(f"no initializer named {name!r} in this module")
        return getattr(self, self._attr[name])

    def named_initializers(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(ONNX name, tensor) for every stored tensor, parameters and buffers alike."""
        for name in self.initializer_names:
            yield name, self.param(name)

    def torch_name(self, name: str) -> str:
        """The attribute (state-dict key) an initializer is registered under."""
        return self._attr[name]

    # -------------------------------------------------------------------------------- masks

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Registered masks (ONNX initializer name -> bool tensor, True = kept)."""
        return {name: getattr(self, attr) for name, attr in self._masks.items()}

    def set_masks(self, masks: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Register ``masks`` (True keeps a weight): masked weights are zeroed now, their gradients
        are zeroed by hooks, and :meth:`enforce_masks` re-zeroes them after an optimizer step."""
        for name, mask in masks.items():
            if name not in self._attr:
                raise OnnxPruneError(f"mask for {name!r}: no initializer of that name in the model")
            p = self.param(name)
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).to(p.device).bool()
            if tuple(m.shape) != tuple(p.shape):
                raise OnnxPruneError(f"mask for {name!r} has shape {tuple(m.shape)}, the initializer {tuple(p.shape)}")
            attr = self._masks.get(name) or _safe_name("mask__" + self._attr[name], set(), self)
            if name in self._masks:
                setattr(self, attr, m)
            else:
                self.register_buffer(attr, m, persistent=False)
                self._masks[name] = attr
                self._hook_mask(name, attr)
        self.enforce_masks()

    def _hook_mask(self, name: str, attr: str) -> None:
        p = self.param(name)
        if isinstance(p, nn.Parameter):
            p.register_hook(lambda g: g.masked_fill(~getattr(self, attr), 0))

    @torch.no_grad()
    def enforce_masks(self) -> None:
        """Zero every masked weight (call after each optimizer step; weight decay and momentum
        cannot then revive a pruned weight)."""
        for name, attr in self._masks.items():
            self.param(name).masked_fill_(~getattr(self, attr), 0)

    # ------------------------------------------------------------------------------ running

    def forward(self, *inputs: torch.Tensor):
        values = self.run(inputs)
        outs = tuple(values[name] for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def run(self, inputs: Sequence | Mapping[str, torch.Tensor], *, keep_all: bool = False) -> dict[str, torch.Tensor]:
        """Execute the graph on ``inputs`` (positional, or a dict by input name); returns the graph
        outputs, and with ``keep_all`` every intermediate tensor, by ONNX name."""
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise OnnxPruneError(f"bridge: missing input(s) {missing}; the model's inputs are {self.input_names}")
            feeds = {n: inputs[n] for n in self.input_names}
        else:
            if len(inputs) != len(self.input_names):
                raise OnnxPruneError(f"bridge: the model takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
            feeds = dict(zip(self.input_names, inputs))
        env: dict[str, torch.Tensor] = {name: self.param(name) for name in self.initializer_names}
        env.update({n: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for n, v in feeds.items()})
        self._flags.bn_train = self.training and self.train_bn
        for i, (fn, n) in enumerate(self._steps):
            args = [env[name] if name else None for name in n.inputs]
            try:
                out = fn(n, *args)
            except (OnnxPruneError, torch.cuda.OutOfMemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised with the node that failed
                raise BridgeRuntimeError(n, exc) from exc
            if isinstance(out, torch.Tensor):
                out = (out,)
            for name, t in zip(n.outputs, out):
                if name:
                    env[name] = t
            if not keep_all:
                for name in self._free[i]:
                    env.pop(name, None)
        return env

    def __getstate__(self) -> dict:
        """Picklable (``torch.save(module)``, ``copy.deepcopy``): op functions are looked up again
        from the table on load, and mask gradient hooks re-registered."""
        state = self.__dict__.copy()
        state["_steps"] = [(None, n) for _, n in self._steps]
        state["_parameters"] = {k: _unhooked(p) for k, p in self._parameters.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._steps = [(ops.TABLE[n.op_type], n) for _, n in self._steps]
        for name, attr in self._masks.items():
            self._hook_mask(name, attr)

    def extra_repr(self) -> str:
        return (f"opset={self.opset}, nodes={len(self._steps)}, inputs={self.input_names}, outputs={self.output_names}, "
                f"trainable={len(self.trainable_names)}/{len(self.initializer_names)}, train_bn={self.train_bn}")


def _unhooked(p: nn.Parameter | None) -> nn.Parameter | None:
    """A parameter without its (unpicklable) mask hooks; same data, same requires_grad."""
    if p is None or not p._backward_hooks:
        return p
    q = nn.Parameter(p.data, requires_grad=p.requires_grad)
    q.grad = p.grad
    return q


def to_torch(model: onnx.ModelProto, *, train_bn: bool = False) -> OnnxModule:
    """Build a trainable torch module executing ``model`` (ideally normalized with
    :func:`onnxprune.core.normalize.normalize`; raw graphs with Constant/Identity/Dropout nodes run too).

    Unsupported ops raise :class:`OnnxPruneError` here, before anything runs. ``train_bn`` makes
    BatchNormalization use batch statistics and update its running ones in train mode (default:
    frozen statistics, trainable affine; see :func:`onnxprune.bridge.ops.batch_norm`).
    """
    return OnnxModule(model, train_bn=train_bn)
