"""The bridge against ONNX's own operator conformance cases (``onnx.backend.test.case.node``, in the
onnx wheel): every case whose ops are all in the bridge's table reproduces the expected outputs within
the case's tolerances (``onnx.backend.test.runner``'s comparison), or the module refuses it when it is
built, for a documented reason. Plus the graphs behind each fix of issue 13 part B, built with
``onnx.helper``."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from cli_util import run_cli  # noqa: E402
from onnxprune.bridge import OnnxModule  # noqa: E402
from onnxprune.bridge.conformance import PASS, REFUSED, claimed, node_cases, refusal_reason, run_case  # noqa: E402
from onnxprune.core.errors import OnnxPruneError  # noqa: E402


@functools.lru_cache(maxsize=None)
def _claimed_cases() -> dict:
    with warnings.catch_warnings():  # the case generators' own overflow warnings
        warnings.simplefilter("ignore")
        return {c.name: c for c in node_cases() if claimed(c.model)}


@functools.lru_cache(maxsize=None)
def _outcome(name: str):
    return run_case(_claimed_cases()[name])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", list(_claimed_cases()))
def test_conformance_case_passes_or_is_refused_at_build(name):
    outcome = _outcome(name)
    assert outcome.status in (PASS, REFUSED), f"{outcome.status}: {outcome.detail}"
    if outcome.status == REFUSED:
        assert refusal_reason(outcome.detail), f"undocumented refusal: {outcome.detail}"


def test_most_claimed_cases_pass():
    """Refusal is the exception: a regression that refused whole op families would still 'conform'."""
    outcomes = [_outcome(name) for name in _claimed_cases()]
    passed = sum(o.status == PASS for o in outcomes)
    assert passed >= 0.75 * len(outcomes), f"only {passed} of {len(outcomes)} claimed cases pass"


def test_recurrent_op_cases_are_claimed_and_pass():
    """ONNX's lstm/gru/rnn cases (batchwise = layout 1, peepholes, reverse, bidirectional) stay
    claimed: a regression dropping the ops from the table would otherwise just leave them unclaimed."""
    names = [n for n, c in _claimed_cases().items() if c.model.graph.node[0].op_type in ("LSTM", "GRU", "RNN")]
    assert len(names) >= 18
    assert [(n, _outcome(n).detail) for n in names if _outcome(n).status != PASS] == []


# ------------------------------------------------------------------------------- helper graphs

def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _layernorm_expand(node_order=None):
    """A Keras LayerNorm as tf2onnx writes it: Mul(d, d) reads one tensor twice, gamma and beta are
    Expanded to the run-time Shape of x."""
    eps = numpy_helper.from_array(np.array(1e-3, np.float32), "eps")
    gamma = numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "gamma")
    beta = numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32), "beta")
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", axes=[-1]),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="sub"),
        helper.make_node("Mul", ["d", "d"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq"], ["var"], name="var", axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
        helper.make_node("Div", ["d", "std"], ["nrm"], name="div"),
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("Expand", ["gamma", "shp"], ["g"], name="expand_gamma"),
        helper.make_node("Expand", ["beta", "shp"], ["b"], name="expand_beta"),
        helper.make_node("Mul", ["nrm", "g"], ["scaled"], name="scale"),
        helper.make_node("Add", ["scaled", "b"], ["y"], name="shift"),
    ]
    if node_order:
        nodes = [nodes[i] for i in node_order]
    return _model(nodes, [_vi("x", ["N", 4, 8])], [_vi("y", ["N", 4, 8])], [eps, gamma, beta], opset=13)


def _layernorm_reference(x):
    mean = x.mean(-1, keepdims=True)
    d = x - mean
    return d / np.sqrt((d * d).mean(-1, keepdims=True) + 1e-3) * np.linspace(0.5, 1.5, 8) + np.linspace(-1, 1, 8)


def test_tensor_read_twice_by_one_node_runs_once():
    """The StopIteration of issue 13: a node reading one producer's output twice (Mul(d, d)) was
    released twice by the topological sort, which then counted too many nodes."""
    x = np.random.default_rng(0).standard_normal((3, 4, 8)).astype(np.float32)
    module = OnnxModule(_layernorm_expand())
    assert [n.name for n in module.nodes].count("square") == 1
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), _layernorm_reference(x), rtol=1e-5, atol=1e-5)


def test_node_reading_two_outputs_of_one_producer():
    m = _model([helper.make_node("Add", ["a", "b"], ["y"], name="add"),
                helper.make_node("Split", ["x"], ["a", "b"], name="split", axis=0)],
               [_vi("x", [4, 3])], [_vi("y", [2, 3])], opset=13)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(OnnxModule(m)(torch.from_numpy(x)).numpy(), x[:2] + x[2:])


def test_unsorted_nodes_and_initializer_listed_as_input():
    """Nodes in reverse file order still run producer first; an initializer that is also a graph
    input (old exporters) is a weight, not an input to feed."""
    m = _layernorm_expand(node_order=list(range(11, -1, -1)))
    m.graph.input.append(_vi("gamma", [8]))
    module = OnnxModule(m)
    assert module.input_names == ["x"]
    x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), _layernorm_reference(x), rtol=1e-5, atol=1e-5)


def test_bridge_check_on_tf2onnx_style_layernorm(tmp_path):
    import onnx

    path = tmp_path / "keras_ln.onnx"
    onnx.save_model(_layernorm_expand(), path)
    code, out, err = run_cli("bridge-check", path, "--input-shape", "x=2x4x8")
    assert code == 0, err
    assert "bridge matches ONNX Runtime" in out


def test_cycle_is_reported_by_node():
    m = _model([helper.make_node("Relu", ["b"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2")],
               [_vi("x", [2])], [_vi("b", [2])])
    with pytest.raises(OnnxPruneError, match="cycle through node r1"):
        OnnxModule(m)


def _run_one(op_type, feeds, opset=17, outputs=1, **attrs):
    names = list(feeds)
    outs = [f"y{i}" for i in range(outputs)]
    ins = [_vi(k, list(v.shape), helper.np_dtype_to_tensor_dtype(v.dtype)) for k, v in feeds.items()]
    m = _model([helper.make_node(op_type, names, outs, name="n", **attrs)], ins,
               [helper.make_empty_tensor_value_info(o) for o in outs], opset=opset)
    res = OnnxModule(m)(*[torch.from_numpy(v) for v in feeds.values()])
    return [r.numpy() for r in res] if outputs > 1 else res.numpy()


def test_resize_align_corners_downsampling_uses_the_fractional_output_width():
    """Spec and reference: ``x * (len_in - 1) / (len_out - 1)`` with ``len_out = scale * len_in``
    (2.4 here, not the 2 output pixels): the second pixel reads coordinate 3 / 1.4."""
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 1, 4)
    y = _run_one("Resize", {"x": x, "roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 1, 0.6], np.float32)},
                 mode="linear", coordinate_transformation_mode="align_corners")
    np.testing.assert_allclose(y.ravel(), [1.0, 1.0 + 3 / 1.4], rtol=1e-6)


def test_space_to_depth_crd_mode():
    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(1, 2, 4, 6)
    y = _run_one("SpaceToDepth", {"x": x}, opset=25, blocksize=2, mode="CRD")
    expected = x.reshape(1, 2, 2, 2, 3, 2).transpose(0, 1, 3, 5, 2, 4).reshape(1, 8, 2, 3)
    np.testing.assert_array_equal(y, expected)


def test_topk_ties_keep_the_lower_index_first():
    x = np.array([[3, 1, 3, 2, 3, 1]], np.float32)
    values, indices = _run_one("TopK", {"x": x, "k": np.array([4], np.int64)}, opset=11, outputs=2)
    np.testing.assert_array_equal(indices, [[0, 2, 4, 3]])
    values, indices = _run_one("TopK", {"x": x, "k": np.array([3], np.int64)}, opset=11, outputs=2, largest=0)
    np.testing.assert_array_equal(indices, [[1, 5, 3]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_mod_fmod0_matches_numpy_sign_of_divisor(dtype):
    """Python/numpy ``mod``: zero remainders take the divisor's sign, subnormal divisors work
    (``torch.remainder`` gave +0 and NaN there)."""
    tiny = np.finfo(dtype).smallest_subnormal
    v = np.array([-4, -3.5, -0.0, 0.0, 1.5, 3, 7, np.inf, -np.inf, np.nan, tiny, -tiny], dtype)
    a, b = (g.ravel() for g in np.meshgrid(v, v))
    with np.errstate(all="ignore"):
        ref = np.mod(a, b)
    out = _run_one("Mod", {"a": a, "b": b}, fmod=0)
    same = ((out == ref) & (np.signbit(out) == np.signbit(ref))) | (np.isnan(out) & np.isnan(ref))
    assert same.all(), list(zip(a[~same], b[~same], out[~same], ref[~same]))


def test_reduce_max_min_over_an_empty_set():
    x = np.zeros((2, 0, 3), np.float32)
    axes = np.array([1], np.int64)
    np.testing.assert_array_equal(_run_one("ReduceMax", {"x": x, "axes": axes}, opset=18), np.full((2, 1, 3), -np.inf))
    np.testing.assert_array_equal(_run_one("ReduceMin", {"x": x, "axes": axes}, opset=18, keepdims=0), np.full((2, 3), np.inf))


def test_cumsum_keeps_int32():
    y = _run_one("CumSum", {"x": np.arange(6, dtype=np.int32), "axis": np.array(0, np.int64)}, opset=14)
    assert y.dtype == np.int32 and y.tolist() == [0, 1, 3, 6, 10, 15]


def test_scatter_nd_swin_style_region_mask():
    """Swin-T's shifted-window mask: region ids written into row/column bands of a zero image
    (k=2 index tuples update whole trailing slices), then ``add`` accumulates duplicates."""
    img = np.zeros((1, 6, 6), np.float32)
    idx = np.array([[0, 4], [0, 5]], np.int64)
    upd = np.full((2, 6), 3.0, np.float32)
    y = _run_one("ScatterND", {"data": img, "indices": idx, "updates": upd}, opset=13)
    expected = img.copy()
    expected[0, 4:] = 3.0
    np.testing.assert_array_equal(y, expected)
    y = _run_one("ScatterND", {"data": img, "indices": np.array([[0, -1], [0, 5]], np.int64), "updates": upd},
                 opset=16, reduction="add")
    assert y[0, 5].tolist() == [6.0] * 6 and not y[0, :5].any()


def test_refusals_are_made_when_the_module_is_built():
    ratio, mode = np.array(0.5, np.float32), np.array(True)
    m = _model([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop")],
               [_vi("x", [2, 3]), _vi("t", [], TensorProto.BOOL)], [_vi("y", [2, 3])],
               [numpy_helper.from_array(ratio, "r")], opset=13)
    with pytest.raises(OnnxPruneError, match="Dropout .*training mode"):
        OnnxModule(m)
    m.graph.initializer.append(numpy_helper.from_array(np.array(False), "t"))
    del m.graph.input[1]
    OnnxModule(m)  # a constant-false training_mode is inference
    m.graph.initializer[-1].CopyFrom(numpy_helper.from_array(mode, "t"))
    with pytest.raises(OnnxPruneError, match="training_mode input 't' is true"):
        OnnxModule(m)
    u = _model([helper.make_node("Add", ["a", "a"], ["y"], name="add")], [_vi("a", [2], TensorProto.UINT32)],
               [_vi("y", [2], TensorProto.UINT32)])
    with pytest.raises(OnnxPruneError, match="UINT32 is not supported.*unsigned"):
        OnnxModule(u)
    s = _model([helper.make_node("ScatterND", ["d", "i", "u"], ["y"], name="sc", reduction="xor")],
               [_vi("d", [2]), _vi("i", [1, 1], TensorProto.INT64), _vi("u", [1])], [_vi("y", [2])], opset=18)
    with pytest.raises(OnnxPruneError, match="reduction 'xor' is not supported"):
        OnnxModule(s)
