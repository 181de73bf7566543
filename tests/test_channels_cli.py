"""``onnxprune analyze``: JSON and human output, bad input."""
from __future__ import annotations

import json

import pytest

from arch_zoo import HELPER_GRAPHS, export_arch
from cli_util import run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return {"resnet": export_arch("resnet_basic", d), "attention": export_arch("attention", d),
            "caffe2": HELPER_GRAPHS["caffe2_sum"](d), "dir": d}


def test_analyze_json(models):
    code, out, err = run_cli("analyze", models["resnet"], "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["prunable_groups"] == 5 and data["unprunable_groups"] == 1
    assert data["prunable_groups"] + data["unprunable_groups"] == len(data["groups"])
    g = data["groups"][0]
    assert set(g) >= {"id", "size", "prunable", "reason", "blocks", "nodes", "members"}
    assert set(g["members"][0]) == {"tensor", "axis", "role", "node"}
    head = [x for x in data["groups"] if not x["prunable"]]
    assert head[0]["reason"] == "reaches model output 'output'" and head[0]["size"] == 10


def test_analyze_json_reasons_for_attention(models):
    code, out, _ = run_cli("analyze", models["attention"], "--json", "--input-shape", "input=1x5x6")
    assert code == 0
    data = json.loads(out)
    assert [g["reason"] for g in data["groups"] if not g["prunable"]] == ["reaches model output 'output'"]
    heads = next(g for g in data["groups"] if g["size"] == 2)  # attention heads, pruned whole
    assert heads["prunable"] and {"/q/MatMul", "/k/MatMul", "/v/MatMul"} <= set(heads["nodes"])


def test_analyze_human_table(models):
    code, out, err = run_cli("analyze", models["caffe2"])
    assert code == 0, err
    assert "group 2 unprunable: reaches model output 'y'" in out
    assert "2 prunable group(s), 1 unprunable" in out


@pytest.mark.parametrize("bad", ["missing.onnx", "garbage.onnx", "dir"])
def test_analyze_bad_input_one_error_line(models, bad):
    d = models["dir"]
    if bad == "garbage.onnx":
        (d / bad).write_bytes(b"not a model at all")
    path = d if bad == "dir" else d / bad
    code, out, err = run_cli("analyze", path)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_analyze_bad_input_shape_name(models):
    code, _, err = run_cli("analyze", models["resnet"], "--input-shape", "nope=1x3x16x16")
    assert code == 1 and err.startswith("error:") and "nope" in err
