"""The one ONNX Runtime session helper: options are explicit, failures are one line, batches pad."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.core.runtime import batches, fixed_batch, load_error, open_session, run_batched, session_options
from onnxprune.core.errors import OnnxPruneError


def _scale_model(batch: int | str) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.array([[2.0, -1.0]], dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"], name="m")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_options_are_explicit_not_inherited(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    so = session_options(intra_op=3, inter_op=2, optimize=False, quiet=True)
    assert (so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level) == (3, 2, 4)
    assert session_options().intra_op_num_threads == 0  # the runtime's own default, not the environment's


def test_fixed_batch_is_padded_and_the_padding_dropped():
    model = _scale_model(4)
    assert fixed_batch(model) == 4 and fixed_batch(_scale_model("N")) is None
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    out = run_batched(open_session(model), {"x": x}, batch_size=32, fixed=4)
    np.testing.assert_allclose(out["y"], x * np.array([2.0, -1.0], dtype=np.float32))
    assert [rows for _, rows in batches({"x": x}, 4, pad=True)] == [4, 3]
    assert all(len(b["x"]) == 4 for b, _ in batches({"x": x}, 4, pad=True))


def test_a_model_that_does_not_load_is_one_line(tmp_path):
    bad = _scale_model("N")
    bad.graph.node[0].op_type = "NoSuchOp"
    why = load_error(bad)
    assert why and "\n" not in why and "NoSuchOp" in why
    assert load_error(_scale_model("N")) is None
    with pytest.raises(OnnxPruneError, match="no such file"):
        open_session(tmp_path / "missing.onnx")
    with pytest.raises(OnnxPruneError, match="^mine: ONNX Runtime cannot load it"):
        open_session(bad, what="mine")
