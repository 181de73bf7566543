"""N:M sparsity: the pattern holds along each op's reduction axis in every eligible weight."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_graphs
import zoo
from conftest import random_feeds, run_ort
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.graph import build_view
from onnxprune.metrics.inspection import inspect_model
from onnxprune.sparsity import prune_nm, satisfies_nm
from onnxprune.sparsity.nm import nm_keep_mask
from onnxprune.sparsity.prune import parse_nm
from onnxprune.sparsity.select import prunable_weights

ZOO_NAMES = ["conv_chain", "tiny_resnet", "flatten_mlp"]


@pytest.fixture(scope="module")
def zoo_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo_nm")
    return {name: zoo.export(name, d) for name in ZOO_NAMES}


def many_ops() -> onnx.ModelProto:
    """Conv (grouped), ConvTranspose (grouped), Gemm (transB 0 and 1), MatMul with constant B (2-D, 3-D)
    and constant A, each with its own reduction axis."""
    rng = np.random.default_rng(1)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [w("Wc", 8, 4, 3, 3),        # Conv group=2: Cin/g = 4 along axis 1
             w("Wt", 8, 4, 2, 2),        # ConvTranspose group=2: [Cin=8, Cout/g=4]; Cin/g = 4 along axis 0
             w("Wg0", 8 * 8 * 8, 8),     # Gemm transB=0: K along axis 0
             w("Wg1", 12, 8),            # Gemm transB=1: [N, K], K along axis 1
             w("Wm", 3, 12, 8),          # batched MatMul B: K along axis -2
             w("Wa", 4, 3),              # constant A: A @ x, K along axis -1 = 3, not divisible by 4
             numpy_helper.from_array(np.array([1, 512], np.int64), "shape512"),
             numpy_helper.from_array(np.array([3, 8], np.int64), "shape38")]
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),          # [1,8,8,8]
        helper.make_node("ConvTranspose", ["c", "Wt"], ["t"], name="deconv", group=2, strides=[2, 2]),  # [1,8,16,16]
        helper.make_node("MaxPool", ["t"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),    # [1,8,8,8]
        helper.make_node("Reshape", ["p", "shape512"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "Wg0"], ["g0"], name="gemm0"),                                  # [1,8]
        helper.make_node("Gemm", ["g0", "Wg1"], ["g1"], name="gemm1", transB=1),                       # [1,12]
        helper.make_node("MatMul", ["g1", "Wm"], ["mm"], name="matmul_b"),                             # [3,1,8]
        helper.make_node("Reshape", ["mm", "shape38"], ["mm2"], name="flat2"),                         # [3,8]
        helper.make_node("MatMul", ["Wa", "mm2"], ["y"], name="matmul_a"),                             # [4,8]
    ]
    g = helper.make_graph(nodes, "many", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m, full_check=True)
    return m


AXES = {"Wc": 1, "Wt": 0, "Wg0": 0, "Wg1": 1, "Wm": 1, "Wa": 1}


def test_reduction_axes():
    view = build_view(many_ops())
    assert {p.weight: p.reduction_axis for p in prunable_weights(view)} == AXES


def test_pattern_along_the_reduction_axis_of_every_op():
    model = many_ops()
    res = prune_nm(model, n=2, m=4)
    weights = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    skipped = {s["weight"]: s["reason"] for s in res.summary["skipped"]}
    assert set(skipped) == {"Wa"} and "3 not divisible by 4" in skipped["Wa"]
    assert np.array_equal(weights["Wa"], original["Wa"])  # ineligible: left dense
    for name, axis in AXES.items():
        if name in skipped:
            continue
        w = weights[name]
        assert satisfies_nm(w, 2, 4, axis), name
        runs = np.moveaxis(w, axis, -1).reshape(-1, 4)
        assert (np.count_nonzero(runs, axis=1) == 2).all(), name  # random weights: exactly 2 kept per run
    # explicit check of the layout sparse tensor cores expect: Conv runs along Cin for each (cout, kh, kw)
    wc = weights["Wc"]
    for co, kh, kw in itertools.product(range(8), range(3), range(3)):
        assert np.count_nonzero(wc[co, 0:4, kh, kw]) == 2
    layers = {x["weight"]: x for x in res.summary["layers"]}
    assert all(layers[k]["nm_ok"] for k in AXES if k != "Wa") and not layers["Wa"]["nm_ok"]
    feeds = random_feeds(model)
    run_ort(res.model, feeds)  # still runs


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_2_4_holds_in_every_eligible_zoo_weight(zoo_paths, name):
    path = zoo_paths[name]
    res = prune_nm(path, n=2, m=4)
    view = build_view(res.model)
    skipped = {s["weight"] for s in res.summary["skipped"]}
    for p in prunable_weights(view):
        w = view.const(p.weight)
        if p.weight in skipped:
            assert p.reduction_size % 4 and np.count_nonzero(w) == w.size
        else:
            assert satisfies_nm(w, 2, 4, p.reduction_axis), p.weight
    assert res.summary["achieved_sparsity_eligible"] == pytest.approx(0.5)
    # N:M pruning equals the original with the same weights zeroed
    original = onnx.load(str(path))
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(original)
    pruned = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for t in zeroed.graph.initializer:
        arr = numpy_helper.to_array(t).copy()
        arr[pruned[t.name] == 0] = 0
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    feeds = random_feeds(original, seed=2)
    for a, b in zip(run_ort(res.model, feeds), run_ort(zeroed, feeds)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (1, 2)])
def test_keep_mask_keeps_the_largest(n, m):
    rng = np.random.default_rng(n * 10 + m)
    w = rng.standard_normal((6, 2 * m, 3))
    keep = nm_keep_mask(w, n, m, axis=1)
    assert satisfies_nm(np.where(keep, w, 0), n, m, 1)
    for i, j, k in itertools.product(range(6), range(2), range(3)):
        run = np.abs(w[i, j * m:(j + 1) * m, k])
        kept = keep[i, j * m:(j + 1) * m, k]
        assert kept.sum() == n and run[kept].min() >= run[~kept].max()


def test_keep_mask_ties_prefer_the_first():
    keep = nm_keep_mask(np.ones((1, 8)), 2, 4, axis=1)
    assert keep.tolist() == [[True, True, False, False, True, True, False, False]]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n,m,axis", [(2, 4, 1), (2, 4, 0), (1, 4, 2), (3, 8, 1), (5, 16, 0)])
def test_keep_mask_is_a_stable_descending_sort(dtype, n, m, axis):
    """Ranks by comparison choose exactly what a stable sort of -|w| would, ties (many here: few
    distinct magnitudes, both signs) going to the earlier entry of the run."""
    rng = np.random.default_rng(n + m + axis)
    shape = [3, 4, 5]
    shape[axis] = 2 * m
    w = (rng.integers(-3, 4, size=shape) * 0.5).astype(dtype)
    moved = np.moveaxis(np.abs(w.astype(np.float64)), axis, -1)
    runs = moved.reshape(*moved.shape[:-1], -1, m)
    order = np.argsort(-runs, axis=-1, kind="stable")
    want = np.zeros(runs.shape, dtype=bool)
    np.put_along_axis(want, order[..., :n], True, axis=-1)
    want = np.moveaxis(want.reshape(moved.shape), -1, axis)
    assert np.array_equal(nm_keep_mask(w, n, m, axis), want)


def test_satisfies_nm():
    assert satisfies_nm(np.zeros((4, 8)), 2, 4, 1)
    assert not satisfies_nm(np.ones((4, 8)), 2, 4, 1)
    assert not satisfies_nm(np.zeros((4, 6)), 2, 4, 1)  # not divisible
    w = np.array([[1, 0, 2, 0, 0, 0, 3, 4]])
    assert satisfies_nm(w, 2, 4, 1) and satisfies_nm(w, 2, 4, -1) and not satisfies_nm(w, 1, 4, 1)


def test_inspect_reports_2_4(zoo_paths, tmp_path):
    path = zoo_paths["tiny_resnet"]
    before = {n["name"]: n["nm"] for n in inspect_model(path)["nodes"] if "nm" in n}
    assert not any(v["2:4"] for v in before.values())
    res = prune_nm(path, n=2, m=4)
    after = {n["name"]: n["nm"] for n in inspect_model(res.model)["nodes"] if "nm" in n}
    assert after["/stem/stem.0/Conv"] == {"2:4": False, "eligible": False}
    assert all(v == {"2:4": True, "eligible": True} for k, v in after.items() if k != "/stem/stem.0/Conv")


def test_weights_from_constant_nodes_are_pruned_in_the_normalized_graph():
    model = onnx_graphs.constant_node_weights()
    res = prune_nm(model, n=1, m=3)  # Cin = 3
    view = build_view(res.model)
    (p,) = prunable_weights(view)
    assert satisfies_nm(view.const(p.weight), 1, 3, 1)
    feeds = random_feeds(model)
    run_ort(res.model, feeds)


@pytest.mark.parametrize("spec", ["4:2", "2:2", "0:4", "2", "a:b", "2:4:8", "-1:4", ""])
def test_bad_nm_specs(spec):
    with pytest.raises(OnnxPruneError):
        parse_nm(spec)


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1:8 ") == (1, 8)
