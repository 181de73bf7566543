"""Unstructured pruning: targets met to the weight, MT floors, scopes, criteria, ORT equivalence."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from conftest import random_feeds, run_ort
from onnxprune.core.errors import OnnxPruneError
from onnxprune.sparsity import masks_of, prune_unstructured
from onnxprune.sparsity.select import prunable_weights, select_weights
from onnxprune.core.graph import build_view

ZOO_NAMES = ["conv_chain", "tiny_resnet", "flatten_mlp"]


@pytest.fixture(scope="module")
def zoo_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    return {name: zoo.export(name, d) for name in ZOO_NAMES}


def unequal_mlp(zeros: float = 0.0) -> onnx.ModelProto:
    """x -> MatMul(W1, scale 1) -> Relu -> MatMul(W2, scale 0.01) -> Relu -> Gemm(W3^T, scale 10)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = (0.01 * rng.standard_normal((32, 24))).astype(np.float32)
    w3 = (10 * rng.standard_normal((8, 24))).astype(np.float32)
    if zeros:
        w1[rng.random(w1.shape) < zeros] = 0
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(w3, "W3"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b3")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"), helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"), helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("Gemm", ["r2", "W3", "b3"], ["y"], name="fc3", transB=1)]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _zeroed_like(original: onnx.ModelProto, pruned: onnx.ModelProto) -> onnx.ModelProto:
    """The original model with exactly the pruned model's zeroed weights set to zero."""
    masks = masks_of(pruned)
    m = onnx.ModelProto()
    m.CopyFrom(original)
    for t in m.graph.initializer:
        if t.name in masks:
            arr = numpy_helper.to_array(t).copy()
            arr[~masks[t.name]] = 0
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return m


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.87])
def test_global_target_within_one_weight(zoo_paths, name, sparsity):
    res = prune_unstructured(zoo_paths[name], sparsity=sparsity, scope="global")
    layers = res.summary["layers"]
    total = sum(layer["size"] for layer in layers)
    zeros = sum(layer["size"] - layer["nonzero"] for layer in layers)
    assert abs(zeros - sparsity * total) <= 1
    assert res.summary["achieved_sparsity"] == pytest.approx(zeros / total)
    # the summary describes the returned model
    w = _weights(res.model)
    for layer in layers:
        assert int(np.count_nonzero(w[layer["weight"]])) == layer["nonzero"]


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("sparsity", [0.25, 0.6, 0.9])
def test_layer_target_within_one_weight_per_layer(zoo_paths, name, sparsity):
    res = prune_unstructured(zoo_paths[name], sparsity=sparsity, scope="layer")
    for layer in res.summary["layers"]:
        assert abs((layer["size"] - layer["nonzero"]) - sparsity * layer["size"]) <= 1, layer


def test_params_and_compression_ratio_over_all_params(zoo_paths):
    res = prune_unstructured(zoo_paths["conv_chain"], sparsity=0.5)
    s = res.summary
    import onnxprune

    info = onnxprune.inspect_model(res.model)
    assert s["params"] == info["params"] and s["nonzero_params"] == info["nonzero_params"]
    assert s["compression_ratio"] == pytest.approx(s["params"] / s["nonzero_params"])
    assert s["sparsity_all_params"] == pytest.approx(1 - s["nonzero_params"] / s["params"])
    assert s["sparsity_all_params"] < s["achieved_sparsity"]  # biases and BN params are not pruned
    assert s["target_sparsity_all_params"] == pytest.approx(0.5 * s["prunable_params"] / s["params"])


def test_mt_floors_hold_and_target_is_exact():
    model = unequal_mlp()
    plain = prune_unstructured(model, sparsity=0.6, scope="global")
    by = {layer["weight"]: layer for layer in plain.summary["layers"]}
    assert by["W2"]["nonzero"] == 0  # the small layer collapses under plain global magnitude
    assert any("lost every weight" in n for n in plain.summary["notes"])
    for mt in (0.05, 0.2, 0.35):
        res = prune_unstructured(model, sparsity=0.6, scope="global", min_threshold=mt)
        layers = res.summary["layers"]
        for layer in layers:
            assert layer["nonzero"] >= math.ceil(mt * layer["size"]), (mt, layer)
            assert layer["min_kept"] == math.ceil(mt * layer["size"])
        total = sum(layer["size"] for layer in layers)
        zeros = sum(layer["size"] - layer["nonzero"] for layer in layers)
        assert zeros == round(0.6 * total)
        # the floored layer sits exactly at its floor; the others absorb the rest
        w2 = next(layer for layer in layers if layer["weight"] == "W2")
        assert w2["nonzero"] == math.ceil(mt * w2["size"])


def test_mt_unreachable_target_is_a_clear_error():
    with pytest.raises(OnnxPruneError, match="cannot be reached"):
        prune_unstructured(unequal_mlp(), sparsity=0.9, min_threshold=0.2)


def test_global_and_layer_scope_differ_on_unequal_magnitudes():
    model = unequal_mlp()
    glob = {x["weight"]: x["sparsity"] for x in prune_unstructured(model, sparsity=0.5, scope="global").summary["layers"]}
    lay = {x["weight"]: x["sparsity"] for x in prune_unstructured(model, sparsity=0.5, scope="layer").summary["layers"]}
    assert all(v == pytest.approx(0.5, abs=1 / 200) for v in lay.values())
    assert glob["W2"] > 0.9 and glob["W3"] < 0.05  # one threshold: small weights go, large stay


def test_lamp_keeps_every_layer_alive():
    model = unequal_mlp()
    mag = {x["weight"]: x["nonzero"] for x in prune_unstructured(model, sparsity=0.9).summary["layers"]}
    lamp = {x["weight"]: x["nonzero"] for x in prune_unstructured(model, sparsity=0.9, criterion="lamp").summary["layers"]}
    assert mag["W2"] == 0 and all(v > 0 for v in lamp.values())


def test_sparsity_zero_is_bit_identical(zoo_paths):
    for name in ZOO_NAMES:
        path = zoo_paths[name]
        original = onnx.load(str(path))
        res = prune_unstructured(path, sparsity=0.0)
        assert res.summary["nonzero_params"] == res.summary["params"] or res.summary["achieved_sparsity"] == 0.0
        feeds = random_feeds(original)
        for a, b in zip(run_ort(original, feeds), run_ort(res.model, feeds)):
            assert np.array_equal(a, b)


def test_random_reproducible_by_seed(zoo_paths):
    path = zoo_paths["tiny_resnet"]
    a = masks_of(prune_unstructured(path, sparsity=0.5, criterion="random", seed=3).model)
    b = masks_of(prune_unstructured(path, sparsity=0.5, criterion="random", seed=3).model)
    c = masks_of(prune_unstructured(path, sparsity=0.5, criterion="random", seed=4).model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("kw", [dict(scope="global"), dict(scope="layer"), dict(criterion="random", seed=1),
                                dict(criterion="lamp"), dict(min_threshold=0.3, sparsity=0.6)])
def test_outputs_equal_original_with_same_weights_zeroed(zoo_paths, name, kw):
    path = zoo_paths[name]
    original = onnx.load(str(path))
    res = prune_unstructured(path, **{"sparsity": 0.5, **kw})
    feeds = random_feeds(original, seed=1)
    got = run_ort(res.model, feeds)
    want = run_ort(_zeroed_like(original, res.model), feeds)
    dense = run_ort(original, feeds)
    for g, w, d in zip(got, want, dense):
        assert np.array_equal(g, w)
        assert not np.allclose(g, d)  # pruning did change the function


def test_graph_untouched_apart_from_weights(zoo_paths):
    path = zoo_paths["tiny_resnet"]
    original = onnx.load(str(path))
    res = prune_unstructured(path, sparsity=0.5)
    assert [n.name for n in res.model.graph.node] == [n.name for n in original.graph.node]
    assert [i.name for i in res.model.graph.input] == [i.name for i in original.graph.input]
    onnx.checker.check_model(res.model, full_check=True)


def test_magnitude_x_gradient_uses_gradients():
    model = unequal_mlp()
    view = build_view(model)
    grads = {p.weight: np.ones(view.const(p.weight).shape, np.float32) for p in prunable_weights(view)}
    grads["W3"] = np.zeros_like(grads["W3"])  # zero gradient: these weights don't matter to the loss
    res = prune_unstructured(model, sparsity=0.1, criterion="magnitude_x_gradient", gradients=grads)
    by = {x["weight"]: x for x in res.summary["layers"]}
    total = sum(x["size"] for x in by.values())
    # every pruned weight comes from W3 (score 0), although W3 has the largest magnitudes
    assert by["W3"]["size"] - by["W3"]["nonzero"] == round(0.1 * total)
    assert by["W1"]["sparsity"] == 0 and by["W2"]["sparsity"] == 0
    with pytest.raises(OnnxPruneError, match="needs gradients"):
        prune_unstructured(model, sparsity=0.1, criterion="magnitude_x_gradient")
    with pytest.raises(OnnxPruneError, match="no gradient"):
        prune_unstructured(model, sparsity=0.1, criterion="magnitude_x_gradient", gradients={"W1": grads["W1"]})


def test_existing_zeros_are_spent_first():
    model = unequal_mlp(zeros=0.5)
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    existing = int(w1.size - np.count_nonzero(w1))
    total = sum(numpy_helper.to_array(t).size for t in model.graph.initializer[:3])
    # random criterion would otherwise pick nonzero weights: existing zeros count towards the target
    res = prune_unstructured(model, sparsity=existing / total / 2, criterion="random")
    assert res.summary["achieved_sparsity"] == pytest.approx(existing / total)
    res = prune_unstructured(model, sparsity=0.5, criterion="random")
    assert abs(res.summary["achieved_sparsity"] * total - 0.5 * total) <= 1


def test_ties_are_broken_deterministically():
    model = unequal_mlp()
    for t in model.graph.initializer:
        if t.name == "W1":
            t.CopyFrom(numpy_helper.from_array(np.ones((16, 32), np.float32), "W1"))
    res = prune_unstructured(model, sparsity=0.25, scope="layer")
    w1 = _weights(res.model)["W1"].reshape(-1)
    k = round(0.25 * w1.size)
    assert not w1[:k].any() and w1[k:].all()  # equal scores: lowest flat indices go first


def test_selection_flags():
    model = unequal_mlp()
    view = build_view(model)
    assert [p.weight for p in prunable_weights(view)] == ["W1", "W2", "W3"]
    assert [p.weight for p in prunable_weights(view, exclude_first=True)] == ["W2", "W3"]
    assert [p.weight for p in prunable_weights(view, exclude_last=True)] == ["W1", "W2"]
    kept, excluded = select_weights(view, ignore=["fc2"])
    assert [p.weight for p in kept] == ["W1", "W3"] and excluded[0]["reason"] == "matches --ignore fc2"
    res = prune_unstructured(model, sparsity=0.5, exclude_first=True, exclude_last=True)
    assert [x["weight"] for x in res.summary["layers"]] == ["W2"]
    assert np.array_equal(_weights(res.model)["W1"], _weights(model)["W1"])
    with pytest.raises(OnnxPruneError, match="no prunable weights"):
        prune_unstructured(model, sparsity=0.5, ignore=["fc*"])


def test_first_and_last_layers_on_a_residual_net(zoo_paths):
    view = build_view(onnx.load(str(zoo_paths["tiny_resnet"])))
    every = [p.node for p in prunable_weights(view)]
    no_first = [p.node for p in prunable_weights(view, exclude_first=True)]
    no_last = [p.node for p in prunable_weights(view, exclude_last=True)]
    assert set(every) - set(no_first) == {"/stem/stem.0/Conv"}
    assert set(every) - set(no_last) == {"/fc/Gemm"}


@pytest.mark.parametrize("bad", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=float("nan")),
                                 dict(sparsity=0.5, scope="local"), dict(sparsity=0.5, criterion="l1"),
                                 dict(sparsity=0.5, min_threshold=1.5)])
def test_bad_arguments(bad):
    with pytest.raises(OnnxPruneError):
        prune_unstructured(unequal_mlp(), **bad)


def test_input_model_is_not_modified():
    model = unequal_mlp()
    before = model.SerializeToString()
    prune_unstructured(model, sparsity=0.7)
    assert model.SerializeToString() == before


def _reference_global_masks(scores, k, caps):
    """The ranking as one concatenated array (what global_masks did before it stopped copying scores)."""
    from onnxprune.sparsity.allocate import lowest

    flat = np.concatenate([s.reshape(-1) for s in scores])
    allowed = np.concatenate([lowest(s.reshape(-1), cap) for s, cap in zip(scores, caps)])
    candidates = np.flatnonzero(allowed)
    keep = np.ones(flat.size, dtype=bool)
    keep[candidates[lowest(flat[candidates], k)]] = False
    return np.split(keep, np.cumsum([s.size for s in scores])[:-1])


@pytest.mark.parametrize("seed", range(12))
def test_global_masks_match_one_concatenated_ranking(seed):
    """Many ties (few distinct values, -inf for zeros), several layers, with and without MT floors, at
    every sparsity from nothing to the most the floors allow: the same weights as one ranking over
    all layers, ties going to earlier layers and lower positions."""
    from onnxprune.sparsity.allocate import floors, global_masks

    rng = np.random.default_rng(seed)
    scores = [rng.integers(0, 4, size=rng.integers(1, 40)).astype(np.float32) for _ in range(rng.integers(1, 5))]
    scores[0][: scores[0].size // 3] = -np.inf
    sizes = [s.size for s in scores]
    for mt in (0.0, 0.3):
        caps = [n - f for n, f in zip(sizes, floors(sizes, mt))]
        for sparsity in np.linspace(0, sum(caps) / sum(sizes), 9):
            k = int(round(sparsity * sum(sizes)))
            got = global_masks([s.copy() for s in scores], float(sparsity), mt)
            want = _reference_global_masks(scores, k, caps)
            assert [g.tolist() for g in got] == [w.tolist() for w in want], (mt, sparsity)
            assert sum(int((~g).sum()) for g in got) == k


def _with_initializers_normalization_drops() -> onnx.ModelProto:
    """unequal_mlp plus an unused initializer and a Reshape of constants feeding an Add (normalization
    folds the Reshape, so its data and shape initializers leave the normalized model), with the
    dynamic batch real exports have (so the view is indexed over a shape-fixed copy)."""
    m = unequal_mlp()
    g = m.graph
    g.initializer.insert(1, numpy_helper.from_array(np.arange(6, dtype=np.float32), "unused"))
    g.initializer.append(numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32), "bias_flat"))
    g.initializer.append(numpy_helper.from_array(np.array([1, 8], dtype=np.int64), "bias_shape"))
    g.node[-1].output[0] = "y0"
    g.node.extend([helper.make_node("Reshape", ["bias_flat", "bias_shape"], ["bias2d"], name="reshape_bias"),
                   helper.make_node("Add", ["y0", "bias2d"], ["y"], name="add_bias")])
    g.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    g.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return m


@pytest.mark.parametrize("prune", [
    lambda src: prune_unstructured(src, sparsity=0.6),
    lambda src: prune_unstructured(src, sparsity=0.6, scope="layer", min_threshold=0.2),
], ids=["global", "layer-mt"])
def test_file_and_in_memory_inputs_give_the_same_model(prune, tmp_path):
    """A file's model is normalized in place and its weights are written back from the normalized
    model (initializers normalization dropped are read from the file again): the result is byte for
    byte what the same model given in memory yields, the input graph kept as it was."""
    from onnxprune.core.model_io import save_model

    model = _with_initializers_normalization_drops()
    path = tmp_path / "m.onnx"
    save_model(model, path)
    before = path.read_bytes()
    from_file, in_memory = prune(path), prune(model)
    assert from_file.model.SerializeToString() == in_memory.model.SerializeToString()
    assert from_file.summary == in_memory.summary
    out = from_file.model
    assert [t.name for t in out.graph.initializer] == [t.name for t in model.graph.initializer]
    assert [n.name for n in out.graph.node] == [n.name for n in model.graph.node]
    kept = _weights(model)
    for name in ("unused", "bias_flat", "bias_shape", "b3"):
        np.testing.assert_array_equal(_weights(out)[name], kept[name])
    assert 0.55 < from_file.summary["achieved_sparsity"] <= 0.6
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)}
    for a, b in zip(run_ort(_zeroed_like(model, out), feeds), run_ort(out, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert path.read_bytes() == before
