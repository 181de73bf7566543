"""``prune_structured`` end to end on the test zoo: valid, runnable models whose figures are what the
summary says; limits, targets, criteria, seeds and argument checks."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import arch_zoo
import zoo
from conftest import random_feeds, run_ort
from onnxprune.core.errors import OnnxPruneError
from onnxprune.metrics.inspection import inspect_model
from onnxprune.core.normalize import normalize
from onnxprune.structured.prune import prune_structured

ZOO_NAMES = list(zoo.ZOO)
ARCH_NAMES = [f"arch/{n}" for n in list(arch_zoo.ARCHS) + list(arch_zoo.HELPER_GRAPHS)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("structured_zoo")
    paths = {name: zoo.export(name, d) for name in ZOO_NAMES}
    a = tmp_path_factory.mktemp("structured_arch")
    paths.update({f"arch/{n}": arch_zoo.export_arch(n, a) for n in arch_zoo.ARCHS})
    paths.update({f"arch/{n}": f(a) for n, f in arch_zoo.HELPER_GRAPHS.items()})
    return paths


def _io(model: onnx.ModelProto):
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    inits = {i.name for i in model.graph.initializer}
    return ([(i.name, dims(i)) for i in model.graph.input if i.name not in inits],
            [(o.name, dims(o)) for o in model.graph.output])


def check_pruned(original_path, res, *, feeds_shapes=None):
    """Valid (full check), runs, same I/O names and declared shapes, figures as reported."""
    original = onnx.load(str(original_path))
    onnx.checker.check_model(res.model, full_check=True)
    assert _io(res.model) == _io(original)
    feeds = random_feeds(original, feeds_shapes)
    ref, out = run_ort(original_path, feeds), run_ort(res.model, feeds)
    assert [o.shape for o in out] == [r.shape for r in ref]
    s = res.summary
    info = inspect_model(res.model)  # independent recount
    assert info["macs"] == s["macs_after"] and info["params"] == s["params_after"]
    before = inspect_model(original_path)
    assert before["macs"] == s["macs_before"] and before["params"] == s["params_before"]
    if s["macs_before"] is not None:
        assert s["macs_reduction"] == pytest.approx(s["macs_before"] / s["macs_after"])
    for g in s["groups"]:
        assert 1 <= g["kept"] <= g["total"]
    return s


@pytest.mark.parametrize("name", ZOO_NAMES + ARCH_NAMES)
def test_ratio_half_is_valid_smaller_and_as_reported(name, exported):
    res = prune_structured(exported[name], ratio=0.5)
    s = check_pruned(exported[name], res)
    assert s["method"] == "structured" and s["criterion"] == "l1" and s["scope"] == "local"
    assert s["target"] == {"kind": "ratio", "value": 0.5}
    assert s["params_after"] < s["params_before"]
    if s["macs_before"] is not None:  # shufflenet's chunk keeps MACs unknown before pruning (dynamic Slice)
        assert s["macs_after"] < s["macs_before"]
    assert any(g["kept"] < g["total"] for g in s["groups"])
    assert all({"id", "nodes", "reason"} <= set(u) for u in s["unprunable"])


@pytest.mark.parametrize("name", ZOO_NAMES + ARCH_NAMES)
def test_ratio_zero_gives_identical_outputs(name, exported):
    """Ratio 0 is a no-op: bit-identical to the normalized model (normalization may fold constants,
    which moves float rounding by ~1e-8 from the file as exported)."""
    res = prune_structured(exported[name], ratio=0.0)
    original = onnx.load(str(exported[name]))
    feeds = random_feeds(original)
    normalized = normalize(original)
    for a, b, c in zip(run_ort(exported[name], feeds), run_ort(normalized, feeds), run_ort(res.model, feeds)):
        np.testing.assert_array_equal(b, c)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
    assert res.summary["macs_after"] == res.summary["macs_before"]
    assert res.summary["params_after"] == res.summary["params_before"]


def test_dynamic_batch_survives(exported):
    res = prune_structured(exported["tiny_resnet"], ratio=0.5)
    (name, dims), = _io(res.model)[0]
    assert dims[0] == "batch"
    out = run_ort(res.model, {name: np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)})
    assert out[0].shape == (3, 10)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "fpgm", "lamp", "random"])
def test_every_criterion(criterion, exported):
    res = prune_structured(exported["tiny_resnet"], ratio=0.5, criterion=criterion)
    s = check_pruned(exported["tiny_resnet"], res)
    assert s["criterion"] == criterion and s["macs_after"] < s["macs_before"]


def test_bn_criterion_leaves_groups_without_bn_whole(exported):
    res = prune_structured(exported["conv_chain"], ratio=0.5, criterion="bn")
    s = check_pruned(exported["conv_chain"], res)
    assert any("no BatchNormalization" in u["reason"] for u in s["unprunable"])
    with pytest.raises(OnnxPruneError, match="BatchNormalization"):
        prune_structured(exported["flatten_mlp"], ratio=0.5, criterion="bn")


def test_taylor_needs_gradients(exported):
    with pytest.raises(OnnxPruneError, match="criterion taylor needs --data"):
        prune_structured(exported["conv_chain"], ratio=0.5, criterion="taylor")
    model = onnx.load(str(exported["conv_chain"]))
    rng = np.random.default_rng(0)
    grads = {i.name: rng.standard_normal(tuple(i.dims)) for i in model.graph.initializer}
    res = prune_structured(model, ratio=0.5, criterion="taylor", gradients=grads)
    assert res.summary["macs_after"] < res.summary["macs_before"]


def test_reproducible_by_seed(exported):
    path = exported["tiny_resnet"]
    a = prune_structured(path, ratio=0.5, criterion="random", seed=3)
    b = prune_structured(path, ratio=0.5, criterion="random", seed=3)
    c = prune_structured(path, ratio=0.5, criterion="random", seed=4)
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.model.SerializeToString() != c.model.SerializeToString()


def test_global_scope_and_round_to(exported):
    s = check_pruned(exported["tiny_resnet"], prune_structured(exported["tiny_resnet"], ratio=0.5, scope="global"))
    assert s["channels_after"] == pytest.approx(s["channels_before"] / 2, abs=2)
    s = check_pruned(exported["tiny_resnet"], prune_structured(exported["tiny_resnet"], ratio=0.6, round_to=4))
    assert all(g["kept"] % 4 == 0 for g in s["groups"] if g["total"] >= 4)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_extreme_ratio_never_collapses(scope, exported):
    for name in ZOO_NAMES + ARCH_NAMES:
        res = prune_structured(exported[name], ratio=0.99, max_ratio=0.99, scope=scope)
        s = check_pruned(exported[name], res)
        assert all(g["kept"] >= 1 for g in s["groups"])


def test_ignore_keeps_matching_groups_whole(exported):
    path = exported["conv_chain"]
    base = prune_structured(path, ratio=0.5)
    first = base.summary["groups"][0]
    res = prune_structured(path, ratio=0.5, ignore=[first["nodes"][0]])
    s = check_pruned(path, res)
    assert first["id"] not in {g["id"] for g in s["groups"]}
    assert any(u["id"] == first["id"] and "--ignore" in u["reason"] for u in s["unprunable"])
    assert s["macs_after"] > base.summary["macs_after"]


@pytest.mark.parametrize("kind, name", [("macs", "tiny_resnet"), ("params", "tiny_resnet"), ("macs", "arch/mobilenet_v2"),
                                        ("macs", "arch/resnext"), ("params", "arch/convnext")])
def test_target_is_met_and_reported(kind, name, exported):
    path = exported[name]
    res = prune_structured(path, **{f"target_{kind}": 0.5})
    s = check_pruned(path, res)
    achieved = s[f"{kind}_after"] / s[f"{kind}_before"]
    assert s["target"]["kind"] == kind and s["target"]["value"] == 0.5
    assert s["target"]["achieved"] == pytest.approx(achieved)
    assert achieved <= 0.5
    # a hair less pruning no longer meets the target: the search stopped within one channel step
    looser = prune_structured(path, ratio=max(s["target"]["ratio"] - 2e-4, 0.0))
    assert looser.summary[f"{kind}_after"] / s[f"{kind}_before"] > 0.5


def test_unreachable_target_is_a_clear_error(exported):
    with pytest.raises(OnnxPruneError, match="unreachable"):
        prune_structured(exported["tiny_resnet"], target_macs=0.01, max_ratio=0.5)


@pytest.mark.parametrize("kw, match", [
    ({}, "exactly one"),
    ({"ratio": 0.5, "target_macs": 0.5}, "exactly one"),
    ({"ratio": 1.0}, "ratio"),
    ({"ratio": -0.1}, "ratio"),
    ({"target_macs": 0.0}, "target-macs"),
    ({"target_params": 1.5}, "target-params"),
    ({"ratio": 0.5, "criterion": "l3"}, "criterion"),
    ({"ratio": 0.5, "scope": "world"}, "scope"),
    ({"ratio": 0.5, "round_to": 0}, "round-to"),
    ({"ratio": 0.5, "min_keep": 0}, "min-keep"),
    ({"ratio": 0.5, "max_ratio": 1.0}, "max-ratio"),
    ({"ratio": 0.5, "seed": 1.5}, "seed"),
])
def test_bad_arguments(kw, match, exported):
    with pytest.raises(OnnxPruneError, match=match):
        prune_structured(exported["conv_chain"], **kw)


def test_groups_normalized_over_channels_are_flagged(exported):
    s = prune_structured(exported["arch/convnext"], ratio=0.5).summary
    assert any("LayerNormalization" in (g.get("inexact") or "") for g in s["groups"])
    assert any("fine-tune" in n for n in s["notes"])
    assert not any("inexact" in g for g in prune_structured(exported["tiny_resnet"], ratio=0.5).summary["groups"])
