"""Every kind of bad input gives one clear line naming the file, a non-zero exit and no traceback."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

import onnx_graphs
import zoo
from cli_util import run_cli
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core import model_io
from onnxprune.core.model_io import (atomic_path, load_graph, load_model, model_files, proto_bytes, refuse_overwrite_input, save_model,
                                without_initializers)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return zoo.export("conv_chain", tmp_path_factory.mktemp("io"))


def _bad_files(tmp_path, good):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 8)
    bad_check = tmp_path / "badcheck.onnx"
    m = onnx_graphs.constant_node_weights()
    m.graph.node[2].input[1] = "does_not_exist"
    onnx.save(m, str(bad_check))
    custom = tmp_path / "custom.onnx"
    g = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.acme")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)]), str(custom))
    return {
        "missing": (tmp_path / "nope.onnx", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "empty": (empty, "empty"),
        "truncated": (truncated, "not a valid ONNX"),
        "text": (text, "not"),
        "garbage": (garbage, "not"),
        "checker": (bad_check, "fails the ONNX checker"),
        "custom_domain": (custom, "unsupported domain"),
    }


CASES = ["missing", "directory", "empty", "truncated", "text", "garbage", "checker", "custom_domain"]


@pytest.mark.parametrize("case", CASES)
def test_load_model_errors(case, tmp_path, good):
    path, words = _bad_files(tmp_path, good)[case]
    with pytest.raises(OnnxPruneError) as exc:
        load_model(path)
    assert str(path) in str(exc.value) and words in str(exc.value)


@pytest.mark.parametrize("case", CASES)
def test_cli_bad_input_one_line(case, tmp_path, good):
    path, words = _bad_files(tmp_path, good)[case]
    code, out, err = run_cli("inspect", path)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0]
    assert "Traceback" not in err + out


def test_cli_bad_input_shape_flag(good):
    code, _, err = run_cli("inspect", good, "--input-shape", "input=1xAx3")
    assert code == 2 and "input-shape" in err and "Traceback" not in err
    code, _, err = run_cli("inspect", good, "--input-shape", "nosuch=1x3x16x16")
    assert code == 1 and "nosuch" in err


def test_debug_flag_shows_traceback(tmp_path):
    code, _, err = run_cli("--debug", "inspect", tmp_path / "nope.onnx")
    assert code == 1 and "Traceback" in err


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.onnx"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_save_model_does_not_touch_caller_model(tmp_path):
    m = onnx_graphs.constant_subgraph_weights()
    before = m.SerializeToString()
    save_model(m, tmp_path / "a.onnx")
    assert m.SerializeToString() == before
    assert load_model(tmp_path / "a.onnx").SerializeToString() == before


def test_refuse_overwrite_input(good):
    with pytest.raises(OnnxPruneError, match="overwrite the input"):
        refuse_overwrite_input(good, good)


def test_missing_optional_package_is_exit_3(monkeypatch, tmp_path, good):
    """On an edge device without torch, training commands say what to install instead of crashing."""
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)
    code, out, err = run_cli("finetune", good, "-o", tmp_path / "x.onnx", "--data", "digits")
    assert code == 3 and "onnxprune[train]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_proto_bytes_and_the_weight_free_copy():
    """Over 2 GB protobuf cannot count a model (EncodeError); the weight-free copy plus each weight
    is what onnxprune counts then: everything but the initializers survives it, and the sum is
    within a few bytes per weight of protobuf's own count."""
    m = onnx_graphs.constant_subgraph_weights()
    m.doc_string = "kept"
    m.metadata_props.add(key="k", value="v")
    assert proto_bytes(m) == m.ByteSize()
    light = without_initializers(m)
    assert len(light.graph.initializer) == 0 and light.doc_string == "kept" and light.metadata_props[0].value == "v"
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(light)
    rebuilt.graph.initializer.extend(m.graph.initializer)
    assert rebuilt.SerializeToString() == m.SerializeToString()
    counted = light.ByteSize() + sum(model_io._tensor_bytes(t) for t in m.graph.initializer)
    assert 0 <= counted - m.ByteSize() <= 6 * len(m.graph.initializer)


def test_save_model_over_the_limit_writes_external_data(tmp_path, monkeypatch, good):
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 200)  # as if the model were over 2 GB
    m = onnx.load(str(good))
    before = m.SerializeToString()
    out = save_model(m, tmp_path / "big.onnx")
    assert [p.name for p in model_files(out)] == ["big.onnx", "big.onnx.data"]
    model_io._FILES_SEEN.clear()  # what save_model remembered agrees with a parse of the file
    assert [p.name for p in model_files(out)] == ["big.onnx", "big.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no temp files left
    assert m.SerializeToString() == before  # the caller's model keeps its weights inline
    back = load_model(out)
    assert {t.name: t.raw_data or t.SerializeToString() for t in back.graph.initializer} == \
        {t.name: t.raw_data or t.SerializeToString() for t in onnx.load_from_string(before).graph.initializer}


def test_load_graph_reads_no_weights(tmp_path, monkeypatch, good):
    """Profiling keeps only the graph and the real inputs in memory (ONNX Runtime holds the weights):
    the external data file is not read at all, and weights that old exporters list as inputs are not
    taken for inputs to feed."""
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 200)
    full = onnx.load(str(good))
    out = save_model(full, tmp_path / "ext.onnx")
    (tmp_path / "ext.onnx.data").unlink()
    light = load_graph(out)
    assert len(light.graph.initializer) == 0
    assert [n.name for n in light.graph.node] == [n.name for n in full.graph.node]
    assert [i.name for i in light.graph.input] == [i.name for i in full.graph.input if i.name not in
                                                   {t.name for t in full.graph.initializer}]

    legacy = onnx_graphs.opset9_legacy()
    weights = [t.name for t in legacy.graph.initializer]
    assert set(weights) <= {i.name for i in legacy.graph.input}  # IR 3: weights are graph inputs too
    onnx.save(legacy, str(tmp_path / "legacy.onnx"))
    assert [i.name for i in load_graph(tmp_path / "legacy.onnx").graph.input] == \
        [i.name for i in legacy.graph.input if i.name not in weights]


def test_saved_files_are_known_without_parsing(tmp_path, monkeypatch, good):
    """Sizes of a model just written (inline, then external) need no second parse of a large file."""
    m = onnx.load(str(good))
    inline = save_model(m, tmp_path / "inline.onnx")
    monkeypatch.setattr(model_io, "PROTOBUF_LIMIT", 200)
    external = save_model(m, tmp_path / "external.onnx")

    def no_parse(*args, **kwargs):
        raise AssertionError("model_files parsed a file save_model had just written")

    monkeypatch.setattr(model_io.onnx, "load", no_parse)
    assert [p.name for p in model_files(inline)] == ["inline.onnx"]
    assert [p.name for p in model_files(external)] == ["external.onnx", "external.onnx.data"]


def test_save_model_writes_what_onnx_writes(tmp_path, good):
    """Serialized once (not sized first): the bytes are onnx.save_model's; a text format chosen by the
    extension (.json) is still written as that format."""
    m = onnx.load(str(good))
    onnx.save_model(m, str(tmp_path / "ref.onnx"))
    assert save_model(m, tmp_path / "ours.onnx").read_bytes() == (tmp_path / "ref.onnx").read_bytes()
    as_json = save_model(m, tmp_path / "ours.json")
    assert as_json.read_text(encoding="utf-8").lstrip().startswith("{")
    assert onnx.load(str(as_json)).SerializeToString() == m.SerializeToString()


def test_small_external_weights_are_checked_from_any_working_directory(tmp_path, monkeypatch):
    """A model whose small weights (bias, scales) live in an external file passes the checker
    whatever the current directory: the checker's weight-free copy never reads external data."""
    import numpy as np
    from onnx import numpy_helper

    b = numpy_helper.from_array(np.ones(4, np.float32), "b")
    g = helper.make_graph([helper.make_node("Add", ["x", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [b])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(model_dir / "m.onnx"),
              save_as_external_data=True, location="m.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    unread = onnx.load(str(model_dir / "m.onnx"), load_external_data=False)
    assert unread.graph.initializer[0].data_location == TensorProto.EXTERNAL
    model_io.check_model(unread, "m.onnx")
    assert load_model(model_dir / "m.onnx").graph.node[0].op_type == "Add"
