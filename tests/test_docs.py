"""The documentation stays true to the code: links resolve, flags exist, JSON keys are documented.

`mkdocs build --strict` (in .ci/run) checks the site as a whole; these tests check, in seconds and
without MkDocs, what goes stale when the code changes: a renamed flag, a new JSON key, a moved page.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_reference", DOCS / "hooks" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = _hooks()


def _pages() -> dict[str, str]:
    pages = {str(p.relative_to(DOCS)): p.read_text() for p in DOCS.rglob("*.md")}
    pages["../README.md"] = (ROOT / "README.md").read_text()
    return pages


def test_readme_is_a_short_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_relative_links_resolve():
    generated = set(REF.GENERATED)
    bad = []
    for page, text in _pages().items():
        base = (DOCS / page).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            resolved = (base / path).resolve()
            rel = resolved.relative_to(DOCS.resolve()).as_posix() if resolved.is_relative_to(DOCS.resolve()) else None
            if not resolved.exists() and rel not in generated:
                bad.append(f"{page}: {target}")
    assert not bad, bad


def test_every_flag_named_in_the_docs_exists():
    assert REF.check_pages(_pages()) == []


def test_flag_checker_catches_a_renamed_flag():
    known = {"prune": {"--ratio", "-o"}}
    assert REF.unknown_flags("run `onnxprune prune m.onnx -o x.onnx --ratoi 0.5`", known) == ["onnxprune prune --ratoi"]
    assert REF.unknown_flags("onnxprune makes models smaller --fast", known) == []


def test_cli_reference_lists_every_command_and_flag():
    text = REF.cli_reference()
    for name, cmd in REF.commands().items():
        assert f"## `onnxprune {name}`" in text
        for flag in REF.command_flags(cmd) - {"-h", "--help"}:
            assert f"`{flag}`" in text, (name, flag)


def test_schema_references_list_every_key():
    from onnxprune.profiling.hw_profile import HwProfile
    from onnxprune.recipes.schema import Recipe, Retrain, Stage

    hw = REF.hw_profile_reference()
    for key, field in HwProfile.model_fields.items():
        assert field.exclude or f"| `{key}` |" in hw, key
    recipe = REF.recipe_reference()
    for model in (Recipe, Stage, Retrain):
        assert f"## `{model.__name__}`" in recipe
        for key in model.model_fields:
            assert f"| `{key}` |" in recipe, (model.__name__, key)


def _tiny_cnn(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="r1"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("args", [["inspect"], ["analyze"], ["prune", "--structured", "--ratio", "0.5"],
                                  ["prune", "--unstructured", "--sparsity", "0.5"]])
def test_json_keys_are_documented(tmp_path, args):
    model = _tiny_cnn(tmp_path / "m.onnx")
    cmd = [args[0], model, *(["-o", tmp_path / "o.onnx"] if args[0] == "prune" else []), *args[1:], "--json"]
    code, out, err = run_cli(*cmd)
    assert code == 0, err
    documented = (DOCS / "reference" / "json-output.md").read_text()
    missing = [k for k in json.loads(out) if f"`{k}`" not in documented]
    assert not missing, f"{args[0]} --json keys missing from docs/reference/json-output.md: {missing}"
