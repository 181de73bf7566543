"""Normalization turns exporter quirks into one canonical graph without changing outputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_graphs
import zoo
from conftest import random_feeds, run_ort
from onnxprune.core.model_io import load_model, save_model
from onnxprune.core.normalize import fold_batchnorm, normalize

HELPER_MODELS = {
    "constant_node_weights": onnx_graphs.constant_node_weights,
    "constant_subgraph_weights": onnx_graphs.constant_subgraph_weights,
    "opset9_legacy": onnx_graphs.opset9_legacy,
    "dynamic_dims": onnx_graphs.dynamic_dims,
}


def assert_same_outputs(a, b, feeds, rtol=1e-5, atol=1e-6):
    for x, y in zip(run_ort(a, feeds), run_ort(b, feeds)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", sorted(HELPER_MODELS))
def test_helper_graphs_outputs_unchanged(name):
    model = HELPER_MODELS[name]()
    norm = normalize(model)
    onnx.checker.check_model(norm, full_check=True)
    feeds = random_feeds(model, {"x": [2, 3, 8, 8]} if name == "dynamic_dims" else None)
    assert_same_outputs(model, norm, feeds)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_torch_exports_outputs_unchanged(name, tmp_path):
    path = zoo.export(name, tmp_path)
    model = load_model(path)
    norm = normalize(model)
    assert_same_outputs(model, norm, random_feeds(model))


def test_constant_nodes_become_initializers():
    norm = normalize(onnx_graphs.constant_node_weights())
    assert [n.op_type for n in norm.graph.node] == ["Conv", "Mul"]
    assert {"w", "b", "alpha"} <= {i.name for i in norm.graph.initializer}


def test_constant_subgraphs_fold_and_identity_goes():
    norm = normalize(onnx_graphs.constant_subgraph_weights())
    assert [n.op_type for n in norm.graph.node] == ["Conv", "Relu"]
    conv = norm.graph.node[0]
    inits = {i.name: i for i in norm.graph.initializer}
    assert conv.input[1] in inits and conv.input[2] in inits
    assert list(inits[conv.input[1]].dims) == [4, 3, 3, 3]
    assert inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT
    # dead constant branches (g1, g2) are dropped
    assert "gamma" not in inits


def test_legacy_opset9_weights_inputs_dropout():
    model = onnx_graphs.opset9_legacy()
    norm = normalize(model)
    assert [i.name for i in norm.graph.input] == ["data"]
    assert "Dropout" not in [n.op_type for n in norm.graph.node]
    assert {"Sum", "LRN"} <= {n.op_type for n in norm.graph.node}
    assert norm.opset_import[0].version == 9  # opset kept, not converted


def test_dynamic_dims_kept_and_shape_chain_preserved():
    norm = normalize(onnx_graphs.dynamic_dims())
    dims = norm.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "H", "W"]
    # the batch-dependent Shape chain cannot be folded while the batch is symbolic
    assert "Shape" in [n.op_type for n in norm.graph.node]


def test_every_node_gets_a_unique_name():
    model = onnx_graphs.constant_subgraph_weights()
    for n in model.graph.node:
        n.name = ""
    names = [n.name for n in normalize(model).graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_input_model_not_mutated():
    model = onnx_graphs.constant_node_weights()
    before = model.SerializeToString()
    normalize(model)
    assert model.SerializeToString() == before


def test_fold_batchnorm_preserves_outputs(tmp_path):
    model = load_model(zoo.export("conv_chain", tmp_path))
    norm = normalize(model)
    folded = normalize(model, fold_bn=True)
    assert "BatchNormalization" in [n.op_type for n in norm.graph.node]
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert_same_outputs(model, folded, random_feeds(model), rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_counts():
    m = normalize(onnx_graphs.constant_node_weights())
    assert fold_batchnorm(m) == 0


def test_external_data_round_trip(tmp_path):
    model = onnx_graphs.constant_subgraph_weights()
    path = tmp_path / "ext.onnx"
    onnx.save_model(onnx_graphs.constant_subgraph_weights(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.bin", size_threshold=0)
    assert (tmp_path / "ext.bin").exists()
    loaded = load_model(path)
    out = save_model(normalize(loaded), tmp_path / "out" / "norm.onnx")
    assert_same_outputs(model, out, random_feeds(model))


def test_sparse_initializers_are_densified(tmp_path):
    from onnxprune.metrics.inspection import inspect_model
    from onnxprune.sparsity.storage import to_sparse_storage

    model = normalize(load_model(zoo.export("flatten_mlp", tmp_path)))
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    w = next(i for i in model.graph.initializer if i.name == fc.input[1])
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[:, : arr.shape[1] * 9 // 10] = 0  # 90% zeros: sparse storage pays off
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    sparse, moved, _ = to_sparse_storage(model, [w.name])
    assert moved == [w.name] and len(sparse.graph.sparse_initializer) == 1
    path = save_model(sparse, tmp_path / "sparse.onnx")
    dense_info, sparse_info = inspect_model(model), inspect_model(path)  # load_model's checker accepts it
    assert sparse_info["params"] == dense_info["params"]
    assert sparse_info["nonzero_params"] == dense_info["nonzero_params"] < dense_info["params"]
    assert_same_outputs(model, normalize(sparse), random_feeds(model))


@pytest.mark.parametrize("name", ["constant_subgraph_weights", "dynamic_dims"])
def test_prepare_from_a_file_holds_the_weights_once(name, tmp_path):
    """A file prepare loads itself is normalized in place (its ``original`` keeps the file's graph
    and metadata, not a second set of weights), and a model whose input shapes are already concrete
    is indexed without a shape-fixed copy. Either copy would double a large model's memory."""
    from onnxprune.core.prepare import prepare

    model = HELPER_MODELS[name]()
    path = tmp_path / "m.onnx"
    save_model(model, path)
    before = path.read_bytes()
    shapes = {"x": (2, 3, 8, 8)} if name == "dynamic_dims" else None
    p = prepare(path, shapes)
    assert len(p.original.graph.initializer) == 0
    assert [n.op_type for n in p.original.graph.node] == [n.op_type for n in model.graph.node]
    assert p.original.opset_import == model.opset_import
    assert p.model.graph.initializer  # the weights live here, once
    if name == "dynamic_dims":  # symbolic dims are fixed on a copy; the normalized model keeps them
        assert p.view.model is not p.model and p.view.shape("x") == (2, 3, 8, 8)
        assert p.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    else:
        assert p.view.model is p.model
    assert_same_outputs(model, p.model, random_feeds(model, shapes))
    assert path.read_bytes() == before


def _shared_vectors_graph() -> onnx.ModelProto:
    """Two LayerNorms reading one weight/bias (as the dynamo exporter dedups identical ones) and
    two DequantizeLinear nodes reading one scale/zero-point."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "ln_w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "ln_b"),
             numpy_helper.from_array(rng.integers(-8, 8, (8, 8)).astype(np.int8), "q1"),
             numpy_helper.from_array(rng.integers(-8, 8, (8, 8)).astype(np.int8), "q2"),
             numpy_helper.from_array(np.full(8, 0.1, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(8, np.int8), "zp")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_w", "ln_b"], ["h1"], name="ln1", axis=-1),
             helper.make_node("DequantizeLinear", ["q1", "scale", "zp"], ["w1"], name="dq1", axis=1),
             helper.make_node("MatMul", ["h1", "w1"], ["m1"], name="mm1"),
             helper.make_node("LayerNormalization", ["m1", "ln_w", "ln_b"], ["h2"], name="ln2", axis=-1),
             helper.make_node("DequantizeLinear", ["q2", "scale", "zp"], ["w2"], name="dq2", axis=1),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shared_channel_vectors_are_copied_per_node():
    """A norm weight/bias shared by two layers gets one copy per node (else the channel analysis
    couples the layers); quantization scales and zero-points stay shared; outputs are identical."""
    model = _shared_vectors_graph()
    norm = normalize(model)
    nodes = {n.name: n for n in norm.graph.node}
    assert list(nodes["ln1"].input[1:]) == ["ln_w__ln1", "ln_b__ln1"]
    assert list(nodes["ln2"].input[1:]) == ["ln_w__ln2", "ln_b__ln2"]
    assert list(nodes["dq1"].input[1:]) == list(nodes["dq2"].input[1:]) == ["scale", "zp"]
    inits = {i.name for i in norm.graph.initializer}
    assert not {"ln_w", "ln_b"} & inits  # the shared originals are gone
    onnx.checker.check_model(norm, full_check=True)
    assert_same_outputs(model, norm, random_feeds(model, {"x": [3, 8]}))


def test_unshared_copy_names_are_unique():
    """A copy's name never collides with a tensor the graph already has."""
    from onnx import numpy_helper

    model = _shared_vectors_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "ln_w__ln1"))
    norm = normalize(model)
    ln1 = next(n for n in norm.graph.node if n.name == "ln1")
    assert ln1.input[1] not in ("ln_w", "ln_w__ln1") and ln1.input[1].startswith("ln_w__ln1")
    weight = next(i for i in norm.graph.initializer if i.name == ln1.input[1])
    assert list(weight.dims) == [8]
