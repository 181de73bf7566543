"""LSTM, GRU and RNN in the bridge: every attribute combination against ONNX Runtime (directions,
sequence_lens, initial states, clip, input_forget, peepholes, linear_before_reset, activations),
layout=1 (which ONNX Runtime refuses) against layout=0, refusals at build time, W/R/B trained and
written back, and a CRNN exported by torch through ``bridge-check`` and ``finetune --teacher``."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from cli_util import run_cli  # noqa: E402
from conftest import run_ort  # noqa: E402
from onnxprune.bridge import OnnxModule, check_bridge, write_back  # noqa: E402
from onnxprune.core.errors import OnnxPruneError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_model(op, *, T=5, N=3, I=4, H=6, direction="forward", layout=0, lens=False, init=False, peephole=False,
              bias=True, seed=0, **attrs):
    """One recurrent node with its weights as initializers; returns (model, x)."""
    rng = np.random.default_rng(seed)
    D, G = (2 if direction == "bidirectional" else 1), GATES[op]
    inits = {"W": rng.normal(0, .5, (D, G * H, I)), "R": rng.normal(0, .5, (D, G * H, H))}
    if bias:
        inits["B"] = rng.normal(0, .5, (D, 2 * G * H))
    if lens:
        inits["lens"] = np.array([T, 2, 4, 1][:N], np.int32)
    state = (N, D, H) if layout else (D, N, H)
    if init:
        inits["h0"] = rng.normal(0, 1, state)
        if op == "LSTM":
            inits["c0"] = rng.normal(0, 1, state)
    if peephole:
        inits["P"] = rng.normal(0, .5, (D, 3 * H))
    slots = ["W", "R", "B", "lens", "h0"] + (["c0", "P"] if op == "LSTM" else [])
    names = ["x"] + [s if s in inits else "" for s in slots]
    while names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h", "Y_c"][:3 if op == "LSTM" else 2]
    node = helper.make_node(op, names, outs, name="rnn", hidden_size=H, direction=direction, layout=layout, **attrs)
    xs = [N, T, I] if layout else [T, N, I]
    tensors = [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in inits.items()]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)],
                              [helper.make_empty_tensor_value_info(o) for o in outs], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, rng.normal(0, 1, xs).astype(np.float32)


def bridge_outputs(model, x):
    with torch.no_grad():
        outs = OnnxModule(model)(torch.from_numpy(x))
    return [o.numpy() for o in (outs if isinstance(outs, tuple) else (outs,))]


EXTRAS = {"LSTM": [{}, {"input_forget": 1}, {"peephole": True}],
          "GRU": [{}, {"linear_before_reset": 1}],
          "RNN": [{}, {"activations": ["Relu"]}]}


@pytest.mark.parametrize("op,direction,extra", [
    (op, d, e) for op in GATES for d in ("forward", "reverse", "bidirectional") for e in EXTRAS[op]],
    ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={val}" for k, val in v.items()) or "plain")
def test_matches_onnxruntime(op, direction, extra):
    """sequence_lens x initial states x clip, for each op, direction and op-specific attribute."""
    extra = dict(extra)
    if "activations" in extra and direction == "bidirectional":
        extra["activations"] = extra["activations"] * 2
    for lens, init, clip in itertools.product([False, True], [False, True], [None, 0.7]):
        kw = {**extra, **({"clip": clip} if clip is not None else {})}
        model, x = rnn_model(op, direction=direction, lens=lens, init=init, **kw)
        ref = run_ort(model, {"x": x})
        ours = bridge_outputs(model, x)
        for name, a, b in zip(["Y", "Y_h", "Y_c"], ours, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name} lens={lens} init={init} clip={clip}")


def test_sequence_lens_zero_output_and_last_valid_state():
    """Past its length an entry outputs zeros and keeps its state: Y_h is Y at the last valid step
    (forward) and at step 0 (reverse, which starts at len - 1)."""
    model, x = rnn_model("GRU", direction="bidirectional", lens=True)
    y, y_h = bridge_outputs(model, x)
    lens = [5, 2, 4]
    for b, n in enumerate(lens):
        assert not y[n:, :, b].any()
        np.testing.assert_array_equal(y_h[0, b], y[n - 1, 0, b])
        np.testing.assert_array_equal(y_h[1, b], y[0, 1, b])


@pytest.mark.parametrize("op", sorted(GATES))
def test_layout_1_is_layout_0_transposed(op):
    """ONNX Runtime refuses layout=1, so it is checked against layout=0 on the same numbers (and by
    ONNX's own *_batchwise conformance cases)."""
    m0, x0 = rnn_model(op, direction="bidirectional", init=True)
    m1, _ = rnn_model(op, direction="bidirectional", init=True, layout=1)
    for t in m1.graph.initializer:  # the same states, batch-major
        if t.name in ("h0", "c0"):
            same = numpy_helper.to_array(next(u for u in m0.graph.initializer if u.name == t.name))
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(same.transpose(1, 0, 2)), t.name))
    outs0 = bridge_outputs(m0, x0)
    outs1 = bridge_outputs(m1, np.ascontiguousarray(x0.transpose(1, 0, 2)))
    np.testing.assert_allclose(outs1[0], outs0[0].transpose(2, 0, 1, 3), rtol=1e-6, atol=1e-6)
    for a, b in zip(outs1[1:], outs0[1:]):
        np.testing.assert_allclose(a, b.transpose(1, 0, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attrs,match", [
    ({"activations": ["Sigmoid", "Tanh", "Tanh"], "activation_alpha": [0.5]}, "activation_alpha"),
    ({"activations": ["Sigmoid", "Affine", "Tanh"]}, "activation 'Affine' is not supported"),
    ({"activations": ["Sigmoid", "Tanh"]}, "has 2 activations; direction 'forward' needs 3"),
    ({"direction": "sideways"}, "direction 'sideways' is not one of"),
    ({"input_forget": 2}, "input_forget 2"),
])
def test_unsupported_attributes_are_refused_when_built(attrs, match):
    direction = attrs.pop("direction", "forward")
    model, _ = rnn_model("LSTM", direction="forward", **attrs)
    if direction != "forward":
        next(a for a in model.graph.node[0].attribute if a.name == "direction").s = direction.encode()
    with pytest.raises(OnnxPruneError, match=match):
        OnnxModule(model)


def test_weights_train_and_write_back_into_the_same_initializers():
    model, x = rnn_model("LSTM", direction="bidirectional", init=True, peephole=True)
    module = OnnxModule(model)
    assert sorted(module.trainable_names) == ["B", "P", "R", "W"]  # initial states are inputs, not weights
    target = torch.randn(5, 2, 3, 6)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((module(torch.from_numpy(x))[0] - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    trained = write_back(model, module)
    assert [t.name for t in trained.graph.initializer] == [t.name for t in model.graph.initializer]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    assert all(not np.array_equal(before[k], after[k]) for k in ("W", "R", "B", "P"))
    assert all(np.array_equal(before[k], after[k]) for k in ("h0", "c0"))
    with torch.no_grad():
        ours = [o.numpy() for o in module(torch.from_numpy(x))]
    for a, b in zip(ours, run_ort(trained, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    """sequence_lens and the states follow the input onto the GPU."""
    model, x = rnn_model("LSTM", direction="bidirectional", lens=True, init=True, peephole=True)
    module = OnnxModule(model).cuda().eval()
    with torch.no_grad():
        outs = [o.cpu().numpy() for o in module(torch.from_numpy(x).cuda())]
    for a, b in zip(outs, run_ort(model, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------- CRNN end to end

def _crnn():
    from torch import nn

    class CRNN(nn.Module):
        """Conv stem over a text-line image, columns as time steps, a bidirectional LSTM, per-step classes."""

        def __init__(self, classes: int = 6):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d((2, 1)),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d((4, 1)))
            self.rnn = nn.LSTM(16, 12, bidirectional=True, batch_first=True)
            self.head = nn.Linear(24, classes)

        def forward(self, x):
            seq = self.stem(x).squeeze(2).transpose(1, 2)  # [N, W, C]: columns are time steps
            y, _ = self.rnn(seq)
            return self.head(y)

    torch.manual_seed(0)
    return CRNN().eval()


def _export(module, path, example=None):
    """``torch.onnx.export`` as a user calls it (constant folding on, dynamic batch)."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        example = torch.randn(2, 1, 8, 16) if example is None else example
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def _lstm_weights(model):
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {slot: inits[name] for slot, name in zip("WRB", node.input[1:4])}


@pytest.mark.parametrize("layer", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "torch-weights"])
def test_torch_exported_recurrent_layers_match_onnxruntime(tmp_path, layer, fold):
    """nn.LSTM/GRU/RNN (2 layers, bidirectional, batch_first) as torch exports them: folded into
    ONNX-layout initializers, or (onnxprune's export_torch, no constant folding) torch's own weights
    reordered by Slice/Concat in the graph, which then are the trained parameters. torch's GRU is
    ONNX's linear_before_reset=1."""
    from onnxprune.bridge.torch_export import export_torch

    torch.manual_seed(0)
    rnn = getattr(torch.nn, layer)(6, 5, num_layers=2, bidirectional=True, batch_first=True)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            return self.rnn(x)[0]

    path = tmp_path / "rnn.onnx"
    if fold:
        _export(Wrap().eval(), path, example=torch.randn(2, 7, 6))
    else:
        export_torch(Wrap(), (torch.randn(2, 7, 6),), path)
    model = onnx.load(str(path))
    assert sum(n.op_type == layer for n in model.graph.node) == 2
    report = check_bridge(model, {"input": (3, 7, 6)})
    assert report["status"] == "ok" and report["max_rel_diff"] < 1e-5
    if not fold:
        assert "rnn.weight_hh_l1_reverse" in OnnxModule(model).trainable_names


def test_crnn_bridge_check_and_finetune_with_teacher_cli(tmp_path):
    """A CRNN exported by torch (conv stem + bidirectional nn.LSTM + linear): bridge-check passes,
    then a student with disturbed LSTM weights is distilled label-free toward the dense teacher
    through the CLI; the LSTM's own initializers are what training changed, and the written model
    is closer to the teacher (ONNX Runtime, held-out inputs) than the student was."""
    dense = _export(_crnn(), tmp_path / "crnn.onnx")
    code, out, err = run_cli("bridge-check", dense, "--input-shape", "input=3x1x8x16", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["status"] == "ok" and report["max_rel_diff"] < 1e-4

    model = onnx.load(str(dense))
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    assert node.attribute and dict((a.name, a.s) for a in node.attribute)["direction"] == b"bidirectional"
    rng = np.random.default_rng(0)
    for t in model.graph.initializer:  # the student: the LSTM's recurrent weights disturbed
        if t.name == node.input[2]:
            r = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((r + rng.normal(0, 0.3, r.shape)).astype(np.float32), t.name))
    student = tmp_path / "student.onnx"
    onnx.save_model(model, student)
    x = rng.normal(0, 1, (160, 1, 8, 16)).astype(np.float32)
    np.savez(tmp_path / "lines.npz", x=x)
    out_path, hist_path = tmp_path / "tuned.onnx", tmp_path / "hist.json"
    code, out, err = run_cli("finetune", student, "-o", out_path, "--teacher", dense, "--data", f"npz:{tmp_path / 'lines.npz'}",
                             "--epochs", "3", "--batch-size", "16", "--optimizer", "adamw", "--lr", "0.01",
                             "--no-progress", "--history", hist_path)
    assert code == 0, err
    history = json.loads(hist_path.read_text())
    assert history["bridge_check"]["status"] == "ok"

    tuned = onnx.load(str(out_path))
    before, after = _lstm_weights(model), _lstm_weights(tuned)
    assert all(not np.array_equal(before[k], after[k]) for k in "WRB")
    held_out = rng.normal(0, 1, (64, 1, 8, 16)).astype(np.float32)
    teacher_y = run_ort(dense, {"input": held_out})[0]

    def rel_err(m):
        return float(np.linalg.norm(run_ort(m, {"input": held_out})[0] - teacher_y) / np.linalg.norm(teacher_y))

    assert rel_err(out_path) < 0.7 * rel_err(student)
    code, _, err = run_cli("bridge-check", out_path, "--input-shape", "input=2x1x8x16")
    assert code == 0, err

