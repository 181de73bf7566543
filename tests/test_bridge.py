"""The ONNX->torch bridge on whole models: fidelity against ONNX Runtime (every test architecture),
training through it, batch sizes other than the exported one, write-back and masks, the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnx_graphs  # noqa: E402
import zoo  # noqa: E402
from cli_util import run_cli, subprocess_env  # noqa: E402
from conftest import random_feeds, run_ort  # noqa: E402

from onnxprune.bridge import (TABLE, apply_masks, assert_bridge_faithful, check_bridge,  # noqa: E402
                              to_torch, write_back)
from onnxprune.core.errors import OnnxPruneError  # noqa: E402
from onnxprune.core.model_io import load_model  # noqa: E402
from onnxprune.core.normalize import normalize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

import arch_zoo  # noqa: E402 - the structured-pruning test architectures


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """zoo name -> normalized model (exported once per module)."""
    d = tmp_path_factory.mktemp("bridge_zoo")
    return {name: normalize(load_model(zoo.export(name, d))) for name in zoo.ZOO}


def _batch(model, n, seed=0):
    shapes = {i.name: (n,) + tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:]) for i in model.graph.input}
    return random_feeds(model, shapes, seed)


# ------------------------------------------------------------------------------------- fidelity

@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_matches_onnxruntime(exported, name):
    model = exported[name]
    shape = (3,) + zoo.ZOO[name][1][1:]  # exported with batch 1
    report = assert_bridge_faithful(model, {"input": shape})
    assert report["ok"] and report["first_diverging_node"] is None
    assert report["max_rel_diff"] < 1e-5
    assert report["outputs"][0]["shape"][0] == 3


HELPER_BUILDERS = ["constant_node_weights", "constant_subgraph_weights", "opset9_legacy", "dynamic_dims"]


@pytest.mark.parametrize("builder", HELPER_BUILDERS)
@pytest.mark.parametrize("normalized", [False, True], ids=["raw", "normalized"])
def test_helper_graphs_match_onnxruntime(builder, normalized):
    model = getattr(onnx_graphs, builder)()
    if normalized:
        model = normalize(model)
    assert check_bridge(model, _fixed_shapes(model))["ok"]


def _fixed_shapes(model):
    """Symbolic dims (batch or not) -> 2, for models whose non-batch dims are symbolic too."""
    from onnxprune.core.shapes import graph_inputs

    return {i.name: tuple(d.dim_value if d.HasField("dim_value") else 2 for d in i.type.tensor_type.shape.dim)
            for i in graph_inputs(model)}


@pytest.mark.parametrize("arch", sorted(arch_zoo.ARCHS))
def test_every_structured_pruning_architecture(arch, tmp_path):
    """Acceptance: the bridge check passes on every test architecture from the structured-pruning tests."""
    model = normalize(load_model(arch_zoo.export_arch(arch, tmp_path)))
    report = check_bridge(model, _fixed_shapes(model))
    assert report["ok"], report


@pytest.mark.parametrize("arch,opset", [("fpn", 9), ("fpn", 11), ("attention", 11), ("convnext", 9), ("densenet", 11)])
def test_older_opset_exports(arch, opset, tmp_path):
    """Upsample/Resize-11, Softmax's 2-D coercion, attribute-style Squeeze/Unsqueeze/Split/Slice."""
    model = load_model(arch_zoo.export_arch(arch, tmp_path, opset=opset))
    report = check_bridge(model, _fixed_shapes(model))
    assert report["ok"], report


def test_unnamed_nodes_get_normalize_names(monkeypatch):
    model = onnx_graphs.opset9_legacy()
    for node in model.graph.node:
        node.name = ""
    original = TABLE["LRN"]
    monkeypatch.setitem(TABLE, "LRN", lambda n, x: original(n, x) * 2)
    report = check_bridge(model)
    assert report["first_diverging_node"] == normalize(model).graph.node[3].name == "LRN_3"


@pytest.mark.parametrize("arch", ["resnet_bottleneck", "shufflenet", "attention"])
def test_structurally_pruned_architectures(arch, tmp_path):
    """What finetune receives after structured pruning: sliced weights, rewritten Reshape targets."""
    from onnxprune.structured.prune import prune_structured

    pruned = prune_structured(str(arch_zoo.export_arch(arch, tmp_path)), ratio=0.5).model
    report = check_bridge(pruned, {i.name: (2,) + tuple(d.dim_value for d in i.type.tensor_type.shape.dim[1:])
                                   for i in pruned.graph.input})
    assert report["ok"], report


@pytest.mark.parametrize("graph", sorted(arch_zoo.HELPER_GRAPHS))
def test_every_structured_pruning_helper_graph(graph, tmp_path):
    model = normalize(load_model(arch_zoo.HELPER_GRAPHS[graph](tmp_path)))
    report = check_bridge(model, _fixed_shapes(model))
    assert report["ok"], report


def test_dynamic_reshape_follows_the_batch(tmp_path):
    """Shape -> Gather -> Concat -> Reshape stays unfolded with a symbolic batch and runs at any batch."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 5 * 5, 3)

        def forward(self, x):
            y = self.conv(x)
            return self.fc(y.reshape(y.shape[0], -1))

    from onnxprune.bridge.torch_export import export_torch

    torch.manual_seed(0)
    path = export_torch(Net(), (torch.randn(1, 2, 5, 5),), tmp_path / "dyn.onnx")
    model = normalize(load_model(path))
    assert {"Shape", "Reshape"} <= {n.op_type for n in model.graph.node}
    module = to_torch(model).eval()
    for batch in (1, 4):
        feeds = _batch(model, batch)
        ours = module(torch.from_numpy(feeds["input"])).detach().numpy()
        np.testing.assert_allclose(ours, run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(exported):
    model = exported["tiny_resnet"]
    module = to_torch(model).cuda().eval()
    feeds = _batch(model, 2)
    with torch.no_grad():
        out = module(torch.from_numpy(feeds["input"]).cuda()).cpu().numpy()
    np.testing.assert_allclose(out, run_ort(model, feeds)[0], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------- parameters

def test_parameters_buffers_and_names(exported):
    model = exported["conv_chain"]
    module = to_torch(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert module.initializer_names == list(inits)
    for name, arr in inits.items():
        np.testing.assert_array_equal(module.param(name).detach().numpy(), arr)
    assert dict(module.named_initializers()).keys() == inits.keys()
    assert all("." not in k for k in module.state_dict())
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"][0]
    assert isinstance(module.param(bn.input[1]), torch.nn.Parameter)  # affine trains
    assert not isinstance(module.param(bn.input[3]), torch.nn.Parameter)  # running mean frozen
    conv = [n for n in model.graph.node if n.op_type == "Conv"][0]
    assert isinstance(module.param(conv.input[1]), torch.nn.Parameter)
    assert set(module.trainable_names) == {n for n, p in module.named_initializers() if isinstance(p, torch.nn.Parameter)}


def test_scalar_constants_do_not_train_but_one_output_bias_does():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])
    inits = [numpy_helper.from_array(np.ones((1, 4), np.float32), "fc.weight"),
             numpy_helper.from_array(np.zeros(1, np.float32), "fc.bias"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["g"], transB=1, name="fc"),
             helper.make_node("Mul", ["g", "half"], ["y"], name="scale")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    module = to_torch(model)
    assert module.trainable_names == ["fc.weight", "fc.bias"]
    assert module.torch_name("fc.weight") == "fc_weight"


# ------------------------------------------------------------------------------------ training

def _train(module, feeds, steps=8, lr=0.05, wd=0.0, momentum=0.9, masks=None, optimizer="sgd"):
    x = torch.from_numpy(feeds["input"])
    torch.manual_seed(0)
    target = torch.randint(0, 10, (x.shape[0],))
    if optimizer == "sgd":
        opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=wd)
    if masks is not None:
        apply_masks(module, masks, opt)
    module.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_step_changes_weights_and_lowers_loss(exported):
    model = exported["tiny_resnet"]
    module = to_torch(model)
    before = {n: p.detach().clone() for n, p in module.named_initializers()}
    feeds = _batch(model, 4)
    module.train()
    out = module(torch.from_numpy(feeds["input"]))
    out.sum().backward()
    grads = {n: module.param(n).grad for n in module.trainable_names}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum() > 0) for g in grads.values()) == len(grads)
    module.zero_grad()
    losses = _train(module, feeds, steps=6, lr=0.2)
    assert losses[-1] < losses[0] * 0.8
    changed = [n for n in module.trainable_names if not torch.equal(before[n], module.param(n))]
    assert set(changed) == set(module.trainable_names)
    for name in module.bn_stat_names:  # frozen statistics by default
        assert torch.equal(before[name], module.param(name))


def test_train_bn_updates_running_stats_and_writes_them_back(exported):
    model = exported["conv_chain"]
    module = to_torch(model, train_bn=True)
    feeds = _batch(model, 8)
    _train(module, feeds, steps=2)
    new = write_back(model, module)
    old_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new_inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    assert module.bn_stat_names
    for name in module.bn_stat_names:
        assert not np.array_equal(old_inits[name], new_inits[name])
        np.testing.assert_array_equal(new_inits[name], module.param(name).numpy())
    module.eval()  # eval: running statistics, same function as the written model
    np.testing.assert_allclose(module(torch.from_numpy(feeds["input"])).detach().numpy(), run_ort(new, feeds)[0],
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- write-back

def test_write_back_without_training_is_identical(exported):
    model = exported["tiny_resnet"]
    new = write_back(model, to_torch(model))
    assert new.SerializeToString() == model.SerializeToString()
    assert [n.name for n in new.graph.node] == [n.name for n in model.graph.node]


def test_write_back_after_training_round_trips(exported):
    model = exported["tiny_resnet"]
    module = to_torch(model)
    feeds = _batch(model, 4)
    _train(module, feeds, steps=3)
    new = write_back(model, module)
    onnx.checker.check_model(new, full_check=True)
    assert [(n.name, n.op_type, list(n.input)) for n in new.graph.node] == \
           [(n.name, n.op_type, list(n.input)) for n in model.graph.node]
    assert list(new.opset_import) == list(model.opset_import)
    assert [(t.name, t.data_type, list(t.dims)) for t in new.graph.initializer] == \
           [(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]
    assert new.SerializeToString() != model.SerializeToString()
    module.eval()
    with torch.no_grad():
        ours = module(torch.from_numpy(feeds["input"])).numpy()
    np.testing.assert_allclose(run_ort(new, feeds)[0], ours, rtol=1e-4, atol=1e-5)


def test_write_back_into_constant_nodes_and_sparse_initializers():
    raw = onnx_graphs.constant_node_weights()  # weights held by Constant nodes
    module = to_torch(raw)
    with torch.no_grad():
        module.param("w").mul_(2)
    new = write_back(raw, module)
    assert [n.op_type for n in new.graph.node] == [n.op_type for n in raw.graph.node]
    w_node = next(n for n in new.graph.node if n.output[0] == "w")
    np.testing.assert_array_equal(numpy_helper.to_array(w_node.attribute[0].t), module.param("w").detach().numpy())

    from onnxprune.sparsity.storage import to_sparse_storage

    model = normalize(raw)
    weight = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    arr = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == weight)).copy()
    arr[np.abs(arr) < 1.5] = 0
    dense = write_back(model, _with(to_torch(model), weight, arr))
    sparse, moved, _ = to_sparse_storage(dense, [weight])
    assert moved == [weight]
    module = to_torch(sparse)
    np.testing.assert_array_equal(module.param(weight).detach().numpy(), arr)
    masks = {weight: arr != 0}
    with torch.no_grad():
        module.param(weight).add_(0.5)
    new = write_back(sparse, module, masks)
    assert len(new.graph.sparse_initializer) == 1 and not any(t.name == weight for t in new.graph.initializer)
    from onnxprune.core.model_io import sparse_to_dense
    np.testing.assert_array_equal(sparse_to_dense(new.graph.sparse_initializer[0]), np.where(arr != 0, arr + 0.5, 0))


def _with(module, name, value):
    with torch.no_grad():
        module.param(name).copy_(torch.from_numpy(value))
    return module


def test_write_back_rejects_a_module_from_another_model(exported):
    with pytest.raises(OnnxPruneError, match="built from this model"):
        write_back(exported["conv_chain"], to_torch(exported["tiny_resnet"]))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_masks_preserved_exactly(exported, optimizer):
    from onnxprune.sparsity.masks import masks_of
    from onnxprune.sparsity.prune import prune_unstructured

    pruned = prune_unstructured(exported["conv_chain"], sparsity=0.8).model
    masks = masks_of(pruned)
    assert masks
    module = to_torch(pruned)
    losses = _train(module, _batch(pruned, 8), steps=5, wd=0.1, masks=masks, optimizer=optimizer, lr=0.01)
    assert losses[-1] < losses[0]
    for name, mask in masks.items():
        w = module.param(name).detach().numpy()
        assert not w[~mask].any()
        assert np.count_nonzero(w) == mask.sum()  # the kept weights trained and stayed nonzero
    new = write_back(pruned, module)
    after = masks_of(new)
    assert after.keys() == masks.keys()
    for name in masks:
        np.testing.assert_array_equal(after[name], masks[name])


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_module_copies_keep_ops_and_masks(exported, how):
    import copy
    import io

    model = exported["conv_chain"]
    module = to_torch(model)
    name = module.trainable_names[0]
    mask = np.random.default_rng(0).random(tuple(module.param(name).shape)) < 0.5
    apply_masks(module, {name: mask})
    if how == "deepcopy":
        clone = copy.deepcopy(module)
    else:
        buf = io.BytesIO()
        torch.save(module, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    x = torch.from_numpy(_batch(model, 2)["input"])
    assert torch.equal(clone(x), module(x))
    assert clone.param(name) is not module.param(name)
    clone(x).sum().backward()
    assert not clone.param(name).grad[torch.from_numpy(~mask)].any()


def test_masks_survive_a_plain_step_via_write_back(exported):
    model = exported["conv_chain"]
    conv_w = next(n.input[1] for n in model.graph.node if n.op_type == "Conv")
    shape = module_shape = to_torch(model).param(conv_w).shape
    mask = np.random.default_rng(0).random(tuple(module_shape)) < 0.5
    module = to_torch(model)
    with torch.no_grad():
        module.param(conv_w).add_(1.0)  # an update that ignored the mask
    new = write_back(model, module, {conv_w: mask})
    w = numpy_helper.to_array(next(t for t in new.graph.initializer if t.name == conv_w))
    assert w.shape == tuple(shape) and not w[~mask].any() and w[mask].all()
    with pytest.raises(OnnxPruneError, match="mask"):
        apply_masks(module, {"no_such_weight": mask})
    with pytest.raises(OnnxPruneError, match="shape"):
        apply_masks(module, {conv_w: mask[:1]})


# -------------------------------------------------------------------------------- divergence

def test_first_diverging_node_is_named(exported, monkeypatch):
    model = exported["tiny_resnet"]
    adds = [n.name for n in model.graph.node if n.op_type == "Add"]
    original = TABLE["Add"]
    monkeypatch.setitem(TABLE, "Add", lambda n, a, b: original(n, a, b) * 1.01)
    report = check_bridge(model)
    assert not report["ok"]
    assert report["first_diverging_node"] == adds[0] and report["first_diverging_op"] == "Add"
    with pytest.raises(OnnxPruneError, match=rf"bridge output differs from ONNX Runtime at node {adds[0]} \(op Add\): max rel diff"):
        assert_bridge_faithful(model)


def test_a_failing_node_is_named(exported, monkeypatch):
    def broken(n, x):
        raise RuntimeError("boom")

    monkeypatch.setitem(TABLE, "Relu", broken)
    report = check_bridge(exported["conv_chain"])
    relu = next(n.name for n in exported["conv_chain"].graph.node if n.op_type == "Relu")
    assert not report["ok"] and report["first_diverging_node"] == relu
    assert "boom" in report["error"]


# ------------------------------------------------------------------------------------------- CLI

def test_cli_json(tmp_path):
    path = zoo.export("conv_chain", tmp_path)
    code, out, err = run_cli("bridge-check", path, "--input-shape", "input=2x3x16x16", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["ok"] is True and data["first_diverging_node"] is None
    assert data["max_abs_diff"] < 1e-4 and data["max_rel_diff"] < 1e-4
    assert data["outputs"][0]["shape"] == [2, 10]
    code, out, _ = run_cli("bridge-check", path)
    assert code == 0 and "matches ONNX Runtime" in out


def test_cli_reports_divergence_with_one_error_line(tmp_path, monkeypatch):
    path = zoo.export("conv_chain", tmp_path)
    original = TABLE["Conv"]
    monkeypatch.setitem(TABLE, "Conv", lambda n, *xs: original(n, *xs) + 1e-2)
    code, out, err = run_cli("bridge-check", path, "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and data["first_diverging_node"]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bridge output differs from ONNX Runtime at node ")


@pytest.mark.parametrize("make,expect", [
    (lambda p: p / "missing.onnx", "no such file"),
    (lambda p: (p / "bad.onnx").write_bytes(b"not a model") and p / "bad.onnx", "not a valid ONNX"),
])
def test_cli_bad_input(tmp_path, make, expect):
    code, out, err = run_cli("bridge-check", make(tmp_path))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expect in err


def test_cli_bad_input_shape(tmp_path):
    path = zoo.export("conv_chain", tmp_path)
    code, _, err = run_cli("bridge-check", path, "--input-shape", "nope=1x3x16x16")
    assert code == 1 and err.strip() == "error: --input-shape names 'nope', but the model's inputs are ['input']"
    code, _, err = run_cli("bridge-check", path, "--input-shape", "input=1x3x16")
    assert code == 1 and "rank 4" in err


def test_cli_without_torch(tmp_path):
    """The command module loads without torch; the command itself then says what to install (exit 3)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import onnxprune.commands.bridge_cmd\n"
            "from onnxprune.cli import main; main(['bridge-check', 'm.onnx'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=subprocess_env())
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == "error: bridge-check needs torch (pip install 'onnxprune[train]')"


def test_cli_unsupported_op(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    model = helper.make_model(helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="det")], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "det.onnx")
    code, _, err = run_cli("bridge-check", tmp_path / "det.onnx")
    assert code == 1 and err.strip() == "error: bridge: op Det (node det) is not supported"


def test_bn_with_running_mean_shared_with_a_trainable_tensor_trains():
    """Untrained exports may share one zero initializer between a BN's bias and its running mean."""
    from onnx import TensorProto, helper, numpy_helper

    c = 3
    inits = [numpy_helper.from_array(np.ones(c, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(c, np.float32), "zeros"),
             numpy_helper.from_array(np.ones(c, np.float32), "var")]
    node = helper.make_node("BatchNormalization", ["x", "scale", "zeros", "zeros", "var"], ["y"], name="bn")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 4, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 10
    for train_bn in (False, True):
        module = to_torch(model, train_bn=train_bn).train()
        out = module(torch.randn(2, c, 4, 4))
        out.square().mean().backward()  # raised "not differentiable with respect to running_mean" before
        assert module.param("scale").grad is not None
