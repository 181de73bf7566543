"""Fuzzing: corrupted files and broken models through every command that reads a model.

Byte level (truncation, random byte flips with fixed seeds, a garbage header) and model level
(missing initializer, dangling input, unknown op, opset/IR out of range, no outputs, no nodes, a
self-cycle, impossible group/kernel_shape, dims that disagree with the raw data, NaN weights,
zero-size tensors, unsorted nodes, duplicate output names, wrong input dtype or channels) of small
models, through ``inspect``, ``analyze``, structured/unstructured ``prune`` and ``bridge-check``:
every run exits 0 with a valid output, or 1/2/3 with one ``error:`` line on stderr; never 70, never
a traceback, never a file left in the output directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from cli_util import run_cli

# -------------------------------------------------------------------------------------------- models


def _w(*shape):
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def _finish(nodes, inputs, outputs, inits, opset=17):
    m = h.make_model(h.make_graph(nodes, "fuzz", inputs, outputs, inits), opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def cnn() -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm."""
    inits = [nh.from_array(_w(8, 3, 3, 3), "w1"), nh.from_array(_w(8), "b1"), nh.from_array(_w(8) + 2, "g"),
             nh.from_array(_w(8), "beta"), nh.from_array(np.zeros(8, np.float32), "mu"),
             nh.from_array(np.ones(8, np.float32), "var"), nh.from_array(_w(8, 8, 3, 3), "w2"),
             nh.from_array(_w(5, 8), "wfc"), nh.from_array(_w(5), "bfc")]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4, kernel_shape=[3, 3], name="conv1"),
             h.make_node("BatchNormalization", ["c1", "g", "beta", "mu", "var"], ["n1"], name="bn1"),
             h.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, kernel_shape=[3, 3], name="conv2"),
             h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             h.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             h.make_node("Flatten", ["p"], ["f"], name="flat"),
             h.make_node("Gemm", ["f", "wfc", "bfc"], ["y"], transB=1, name="fc")]
    return _finish(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                   [h.make_tensor_value_info("y", T.FLOAT, ["N", 5])], inits)


def mlp() -> onnx.ModelProto:
    """MatMul -> Add -> Relu -> MatMul -> Add -> Softmax."""
    inits = [nh.from_array(_w(6, 16), "w1"), nh.from_array(_w(16), "b1"), nh.from_array(_w(16, 4), "w2"),
             nh.from_array(_w(4), "b2")]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"), h.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             h.make_node("Relu", ["a1"], ["r1"], name="relu1"), h.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             h.make_node("Add", ["m2", "b2"], ["a2"], name="add2"), h.make_node("Softmax", ["a2"], ["y"], axis=-1, name="sm")]
    return _finish(nodes, [h.make_tensor_value_info("x", T.FLOAT, [2, 6])], [h.make_tensor_value_info("y", T.FLOAT, [2, 4])],
                   inits, opset=13)


def depthwise() -> onnx.ModelProto:
    """Conv -> depthwise Conv (group 8) -> Relu -> Conv: grouped convs and a graph output of 4 channels."""
    inits = [nh.from_array(_w(8, 2, 1, 1), "w1"), nh.from_array(_w(8, 1, 3, 3), "wd"), nh.from_array(_w(4, 8, 1, 1), "w3")]
    nodes = [h.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1], name="pw1"),
             h.make_node("Conv", ["c1", "wd"], ["c2"], group=8, pads=[1] * 4, kernel_shape=[3, 3], name="dw"),
             h.make_node("Relu", ["c2"], ["r"], name="relu"),
             h.make_node("Conv", ["r", "w3"], ["y"], kernel_shape=[1, 1], name="pw2")]
    return _finish(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 6, 6])],
                   [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 6, 6])], inits)


def control_flow() -> onnx.ModelProto:
    """Weights inside If branches and a Loop body (tests/test_control_flow.py)."""
    from test_control_flow import control_flow_model

    return control_flow_model()


MODELS = {"cnn": cnn, "mlp": mlp, "depthwise": depthwise, "control_flow": control_flow}

# ----------------------------------------------------------------------------------- corruptions


def _first(m, op):
    return next(n for n in m.graph.node if n.op_type == op)


def _weight(m):
    """The first weight node's weight initializer."""
    node = next(n for n in m.graph.node if n.op_type in ("Conv", "MatMul", "Gemm"))
    return next(t for t in m.graph.initializer if t.name == node.input[1])


def _set_attr(node, name, value):
    for a in list(node.attribute):
        if a.name == name:
            node.attribute.remove(a)
    node.attribute.append(h.make_attribute(name, value))


def missing_initializer(m):
    m.graph.initializer.remove(_weight(m))


def dangling_input(m):
    m.graph.node[1].input[0] = "nowhere"


def unknown_op(m):
    m.graph.node[1].op_type = "FrobnicateX"


def custom_domain_op(m):
    m.graph.node[1].domain = "com.example"
    m.opset_import.append(h.make_opsetid("com.example", 1))


def opset_too_high(m):
    m.opset_import[0].version = 99


def opset_zero(m):
    m.opset_import[0].version = 0


def ir_too_high(m):
    m.ir_version = 99


def ir_zero(m):
    m.ir_version = 0


def no_outputs(m):
    del m.graph.output[:]


def no_nodes(m):
    del m.graph.node[:]


def self_cycle(m):
    node = m.graph.node[1]
    node.input[0] = node.output[0]


def two_node_cycle(m):
    a, b = m.graph.node[1], m.graph.node[2]
    a.input[0] = b.output[0]


def impossible_group(m):
    node = next((n for n in m.graph.node if n.op_type == "Conv"), m.graph.node[0])
    _set_attr(node, "group", 5)


def impossible_kernel_shape(m):
    node = next((n for n in m.graph.node if n.op_type == "Conv"), m.graph.node[0])
    _set_attr(node, "kernel_shape", [5, 7])


def dims_disagree_with_data(m):
    t = _weight(m)
    t.dims[0] = t.dims[0] * 2


def nan_weights(m):
    t = _weight(m)
    a = nh.to_array(t).copy()
    a[...] = np.nan
    t.CopyFrom(nh.from_array(a, t.name))


def zero_size_weight(m):
    t = _weight(m)
    shape = list(t.dims)
    shape[0] = 0
    t.CopyFrom(nh.from_array(np.zeros(shape, np.float32), t.name))


def zero_size_input(m):
    m.graph.input[0].type.tensor_type.shape.dim[-1].dim_value = 0


def unsorted_nodes(m):
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def duplicate_output_names(m):
    m.graph.node[2].output[0] = m.graph.node[1].output[0]


def duplicate_graph_outputs(m):
    m.graph.output.append(m.graph.output[0])


def wrong_input_dtype(m):
    m.graph.input[0].type.tensor_type.elem_type = T.INT64


def wrong_input_channels(m):
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 7


MODEL_CORRUPTIONS = [missing_initializer, dangling_input, unknown_op, custom_domain_op, opset_too_high, opset_zero,
                     ir_too_high, ir_zero, no_outputs, no_nodes, self_cycle, two_node_cycle, impossible_group,
                     impossible_kernel_shape, dims_disagree_with_data, nan_weights, zero_size_weight, zero_size_input,
                     unsorted_nodes, duplicate_output_names, duplicate_graph_outputs, wrong_input_dtype,
                     wrong_input_channels]


def _bytes_cases(data: bytes) -> dict[str, bytes]:
    n = len(data)
    cases = {f"truncated_at_{f}": data[: int(n * f)] for f in (0.0, 0.01, 0.25, 0.5, 0.9)}
    cases["truncated_last_byte"] = data[:-1]
    for seed in (0, 1, 2, 3):
        rng = np.random.default_rng(seed)
        buf = bytearray(data)
        for pos in rng.integers(0, n, size=8):
            buf[pos] ^= int(rng.integers(1, 256))
        cases[f"byte_flips_seed{seed}"] = bytes(buf)
    cases["garbage_header"] = bytes(np.random.default_rng(7).integers(0, 256, 16, dtype=np.uint8)) + data[16:]
    cases["text_file"] = b"this is not an onnx model\n" * 4
    return cases


# --------------------------------------------------------------------------------------------- runs

COMMANDS = {
    "inspect": ["inspect", "{src}", "--json"],
    "analyze": ["analyze", "{src}", "--json"],
    "structured": ["prune", "{src}", "-o", "{out}", "--structured", "--ratio", "0.5", "--json"],
    "unstructured": ["prune", "{src}", "-o", "{out}", "--unstructured", "--sparsity", "0.5", "--json"],
    "nm": ["prune", "{src}", "-o", "{out}", "--nm", "2:4", "--json"],
    "bridge-check": ["bridge-check", "{src}", "--json"],
}


def _check_run(src: Path, out_dir: Path, command: str) -> str:
    """Run one command on ``src``; assert the contract; return 'ok' or the error line."""
    out = out_dir / "out.onnx"
    before = src.read_bytes()
    args = [a.format(src=src, out=out) for a in COMMANDS[command]]
    code, stdout, stderr = run_cli(*args)
    where = f"{command} on {src.name}: exit {code}, stderr {stderr!r}"
    assert code in (0, 1, 2, 3), where
    assert "Traceback" not in stderr + stdout, where
    assert src.read_bytes() == before, where
    left = sorted(p.name for p in out_dir.iterdir())
    if code != 0:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), where
        assert left == [], f"{where}; left behind {left}"
        return lines[0]
    json.loads(stdout)
    if command in ("structured", "unstructured", "nm"):
        assert left == ["out.onnx"], where
        onnx.checker.check_model(onnx.load(out), full_check=False)
        if _runs(src):  # never worse than the input: what ran still runs
            assert _runs(out), where
        out.unlink()
    else:
        assert left == [], where
    return "ok"


def _runs(path: Path) -> bool:
    """True when ONNX Runtime loads and runs ``path`` on ones (symbolic dims as 1)."""
    try:
        sess = ort.InferenceSession(str(path), _QUIET, providers=["CPUExecutionProvider"])
        feeds = {i.name: np.ones([d if isinstance(d, int) and d > 0 else 1 for d in i.shape],
                                 dtype=np.float32 if i.type == "tensor(float)" else np.int64)
                 for i in sess.get_inputs()}
        sess.run(None, feeds)
    except Exception:  # noqa: BLE001 - any failure: it does not run
        return False
    return True


_QUIET = ort.SessionOptions()
_QUIET.log_severity_level = 4


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_models")
    paths = {}
    for name, build in MODELS.items():
        p = d / f"{name}.onnx"
        onnx.save(build(), p)
        paths[name] = p
    return paths


@pytest.mark.parametrize("model", sorted(MODELS))
def test_byte_corruption(model, model_files, tmp_path):
    data = model_files[model].read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for case, blob in _bytes_cases(data).items():
        src = tmp_path / f"{model}_{case}.onnx"
        src.write_bytes(blob)
        for command in COMMANDS:
            _check_run(src, out_dir, command)


@pytest.mark.parametrize("corrupt", MODEL_CORRUPTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_corruption(model, corrupt, tmp_path):
    m = MODELS[model]()
    try:
        corrupt(m)
    except (StopIteration, IndexError):
        pytest.skip(f"{corrupt.__name__} does not apply to {model}")
    src = tmp_path / f"{model}_{corrupt.__name__}.onnx"
    src.write_bytes(m.SerializeToString())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for command in COMMANDS:
        _check_run(src, out_dir, command)


@pytest.mark.parametrize("command,corrupt", [
    ("bridge-check", wrong_input_channels),
    ("structured", impossible_group)])
def test_one_line_on_the_real_stderr(command, corrupt, tmp_path):
    """In a real process, nothing else (ONNX Runtime's own log lines) reaches stderr."""
    import subprocess
    import sys

    from cli_util import subprocess_env

    m = cnn()
    corrupt(m)
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    args = [a.format(src=src, out=tmp_path / "out.onnx") for a in COMMANDS[command]]
    proc = subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 1, proc.stderr


def test_unsorted_nodes_are_sorted_cycles_and_dangling_inputs_named(tmp_path):
    """ONNX Runtime runs unsorted graphs, so onnxprune reads them too; a cycle or an undefined
    input is named in the error."""
    m = cnn()
    unsorted_nodes(m)
    src = tmp_path / "unsorted.onnx"
    src.write_bytes(m.SerializeToString())
    out = tmp_path / "out.onnx"
    code, _, err = run_cli("prune", src, "-o", out, "--structured", "--ratio", "0.5")
    assert code == 0, err
    assert _runs(out) and [n.name for n in onnx.load(out).graph.node][:2] == ["conv1", "bn1"]
    for corrupt, text in ((two_node_cycle, "cycle through node(s) bn1, relu1"),
                          (missing_initializer, "input 'w1' of node conv1 (Conv) is not produced by any node")):
        m = cnn()
        corrupt(m)
        src.write_bytes(m.SerializeToString())
        code, _, err = run_cli("inspect", src)
        assert code == 1 and text in err, err
