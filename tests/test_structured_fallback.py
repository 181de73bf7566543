"""A failed rewrite never fails the command: the group whose rewrite breaks the model is found by
bisection, left whole with the validator's message, and the other groups are pruned."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from cli_util import run_cli
from onnxprune.channels import rules


def _w(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def three_group_model() -> onnx.ModelProto:
    """conv1 -> BN -> Relu -> conv2 -> Relu -> conv3 -> Relu -> GAP -> Gemm: prunable groups
    {conv1, bn1}, {conv2}, {conv3}; the classifier's output channels are the model output."""
    inits = [nh.from_array(_w(8, 3, 3, 3), "w1"), nh.from_array(_w(8) + 2, "g"), nh.from_array(_w(8), "b"),
             nh.from_array(np.zeros(8, np.float32), "mu"), nh.from_array(np.ones(8, np.float32), "var"),
             nh.from_array(_w(12, 8, 3, 3), "w2"), nh.from_array(_w(16, 12, 3, 3), "w3"), nh.from_array(_w(16, 5), "wfc")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
             h.make_node("BatchNormalization", ["c1", "g", "b", "mu", "var"], ["n1"], name="bn1"),
             h.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, name="conv2"),
             h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             h.make_node("Conv", ["r2", "w3"], ["c3"], pads=[1] * 4, name="conv3"),
             h.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             h.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
             h.make_node("Flatten", ["p"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "wfc"], ["y"], name="fc")]
    g = h.make_graph(nodes, "three", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 5])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "three.onnx"
    onnx.save(three_group_model(), p)
    return p


def _prune(src, dst, *flags):
    code, out, err = run_cli("prune", src, "-o", dst, "--structured", *flags, "--json")
    assert code == 0, err
    return json.loads(out)


def _check_output(dst):
    onnx.checker.check_model(onnx.load(dst), full_check=True)
    y = ort.InferenceSession(str(dst)).run(None, {"x": np.ones((1, 3, 8, 8), np.float32)})[0]
    assert y.shape == (1, 5) and np.isfinite(y).all()


@pytest.mark.parametrize("target", [["--ratio", "0.5"], ["--target-macs", "0.6"], ["--ratio", "0.5", "--scope", "global"]])
def test_broken_rule_drops_only_its_group(src, tmp_path, monkeypatch, target):
    """The BatchNormalization rule, patched to forget the BN parameters, breaks group {conv1, bn1}."""
    monkeypatch.setitem(rules.RULES, "BatchNormalization", rules.rule_passthrough)
    dst = tmp_path / "out.onnx"
    s = _prune(src, dst, *target)
    dropped = s["dropped_groups"]
    assert [d["nodes"][:2] for d in dropped] == [["conv1", "bn1"]]
    assert "bn1" in dropped[0]["reason"] and "shape inference" in dropped[0]["reason"]
    assert any(u["nodes"][:2] == ["conv1", "bn1"] and "breaks the model" in u["reason"] for u in s["unprunable"])
    pruned = {tuple(g["nodes"][:1]): g for g in s["groups"]}
    assert pruned[("conv2",)]["kept"] < 12 and pruned[("conv3",)]["kept"] < 16
    assert any("dropped_groups" in n for n in s["notes"])
    _check_output(dst)
    code, out, _ = run_cli("prune", src, "-o", tmp_path / "text.onnx", "--structured", *target)
    assert code == 0 and "pruning it breaks the model" in out


def test_ort_load_failure_drops_the_group(src, tmp_path, monkeypatch):
    """A rewrite that passes the checker but that ONNX Runtime refuses is dropped the same way."""
    import onnxprune.structured.prune as sp

    real = sp.ort_load_error

    def refuses_small_w3(model):
        w3 = next(t for t in model.graph.initializer if t.name == "w3")
        return "ONNX Runtime cannot load it: w3 too small" if w3.dims[0] < 16 else real(model)

    monkeypatch.setattr(sp, "ort_load_error", refuses_small_w3)
    s = _prune(src, tmp_path / "out.onnx", "--ratio", "0.5")
    assert [(d["nodes"][0], d["reason"]) for d in s["dropped_groups"]] == \
        [("conv3", "pruned model: ONNX Runtime cannot load it: w3 too small")]
    assert {g["nodes"][0] for g in s["groups"]} == {"conv1", "conv2"}
    _check_output(tmp_path / "out.onnx")


def test_no_failure_no_dropped_groups(src, tmp_path):
    s = _prune(src, tmp_path / "out.onnx", "--ratio", "0.5")
    assert s["dropped_groups"] == [] and len(s["groups"]) == 3


def test_per_layer_recipe_pruning_drops_the_broken_group(src, monkeypatch):
    """Recipes' per-layer ratios (and sensitivity analysis) prune through the same fallback."""
    from onnxprune.pipeline.sensitivity import prune_per_layer
    from onnxprune.recipes.schema import Stage

    monkeypatch.setitem(rules.RULES, "BatchNormalization", rules.rule_passthrough)
    res = prune_per_layer(str(src), Stage(kind="structured", criterion="l1"), {"conv*": 0.5})
    s = res.summary
    assert [d["nodes"][0] for d in s["dropped_groups"]] == ["conv1"] and "bn1" in s["dropped_groups"][0]["reason"]
    assert {g["nodes"][0]: g["kept"] for g in s["groups"]} == {"conv2": 6, "conv3": 8}
    onnx.checker.check_model(res.model, full_check=True)


def test_bisection_finds_single_and_combined_culprits():
    """Pure bisection logic: group 3 breaks alone, 5 and 7 only together; every other group is kept,
    and the validator is called far fewer times than once per subset."""
    from onnxprune.core.errors import OnnxPruneError
    from onnxprune.structured.fallback import prune_dropping_broken

    calls = []

    def build(plan):
        calls.append(sorted(plan))
        if 3 in plan:
            raise OnnxPruneError("group 3 breaks Conv x")
        if 5 in plan and 7 in plan:
            raise OnnxPruneError("5 and 7 clash")
        return sorted(plan)

    plan = {g: np.arange(1) for g in range(12)}
    model, dropped = prune_dropping_broken(build, plan, list(range(12)))
    assert dropped[3] == "group 3 breaks Conv x"
    assert len(dropped) == 2 and (dropped.get(5) or dropped.get(7)) == "5 and 7 clash"
    assert model == sorted(g for g in range(12) if g not in dropped)
    assert len(calls) < 30
    model, dropped = prune_dropping_broken(build, {g: plan[g] for g in (0, 1)}, [0, 1])
    assert dropped == {} and model == [0, 1] and calls[-1] == [0, 1]
