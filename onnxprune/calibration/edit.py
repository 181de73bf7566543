"""Writing calibrated weights into a model (in place): replace initializers, give a layer a bias."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class ModelEditor:
    """Initializer and node lookup over one model, for in-place updates."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: t for t in model.graph.initializer}
        self.nodes = {n.name: n for n in model.graph.node}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def set(self, name: str, value: np.ndarray) -> None:
        """Replace initializer ``name`` (same dtype as before)."""
        old = self.inits[name]
        value = np.ascontiguousarray(value.astype(helper.tensor_dtype_to_np_dtype(old.data_type)))
        old.CopyFrom(numpy_helper.from_array(value, name))

    def fresh_name(self, base: str) -> str:
        taken = set(self.inits) | {o for n in self.model.graph.node for o in n.output} | {i.name for i in self.model.graph.input}
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def added_bias(self, node: onnx.NodeProto) -> str | None:
        """The bias :meth:`add_bias` gave ``node`` earlier (a re-fit after a re-fit sets it again)."""
        if node.op_type in ("Conv", "Gemm"):
            name = node.input[2] if len(node.input) > 2 else ""
            return name if ".calibration_bias" in name and name in self.inits else None
        for add in self.readers.get(node.output[0], []):
            if add.op_type == "Add" and ".calibration_add" in add.name and add.input[1] in self.inits:
                return add.input[1]
        return None

    def add_bias(self, node: onnx.NodeProto, bias: np.ndarray, dtype) -> None:
        """Give a Conv/Gemm (as input 2) or MatMul (an Add after it) the bias ``bias``."""
        node_name = node.name or node.output[0]
        name = self.fresh_name(f"{node_name}.calibration_bias")
        t = numpy_helper.from_array(np.ascontiguousarray(bias.astype(dtype)), name)
        self.model.graph.initializer.append(t)
        self.inits[name] = self.model.graph.initializer[-1]
        if node.op_type in ("Conv", "Gemm"):
            while len(node.input) < 2:
                node.input.append("")
            node.input.append(name)
            return
        out = node.output[0]
        mid = self.fresh_name(f"{out}.before_bias")
        node.output[0] = mid
        add = helper.make_node("Add", [mid, name], [out], name=self.fresh_name(f"{node_name}.calibration_add"))
        nodes = list(self.model.graph.node)
        at = nodes.index(node) + 1
        self.model.graph.node.insert(at, add)
        self.nodes[add.name] = self.model.graph.node[at]


def write_layer(ed: ModelEditor, layer, node: onnx.NodeProto, a: np.ndarray, shape: tuple[int, ...], dtype) -> None:
    """Write the affine map ``a`` (weights transposed, bias last row; see :mod:`.fit`) into ``layer``'s
    weight (of ``shape``) and bias, adding a bias where the layer had none and one is needed."""
    ed.set(layer.weight, layer.weight_from(a[:-1].T, shape, dtype))
    bias = a[-1] / layer.beta
    name = layer.bias if layer.bias is not None and layer.bias in ed.inits else ed.added_bias(node)
    if name is not None:
        ed.set(name, bias.reshape(tuple(ed.inits[name].dims)))
    elif np.any(bias != 0):
        ed.add_bias(node, bias, dtype)
