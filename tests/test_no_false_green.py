"""No false green: a missing onnxprune module is a bug that fails loudly (never "not implemented",
never a skipped test); optional third-party packages keep their exit 3 and install line; a figure
eval cannot compute says why instead of vanishing."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_util import run_cli, subprocess_env
from onnxprune import cli
from onnxprune.datasets.fidelity import evaluate_outputs, why_no_top1_agreement
from onnxprune.pipeline import steps

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
OWN_TEST_HELPERS = {p.stem for p in TESTS.glob("*.py")}  # arch_zoo, zoo, cli_util, ...


# ------------------------------------------------------------------------------- static: nothing guards our imports

def _own(name: str | None, level: int = 0) -> bool:
    return bool(level) or (name or "").split(".")[0] in {"onnxprune", *OWN_TEST_HELPERS}


def _imported(node: ast.AST) -> list[tuple[str | None, int]]:
    """The modules a statement or expression imports: import statements and import_module /
    importorskip / find_spec calls with a literal name."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out += [(a.name, 0) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            out.append((n.module, n.level))
        elif isinstance(n, ast.Call) and n.args:
            f, arg = n.func, n.args[0]
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if isinstance(arg, ast.JoinedStr) and arg.values:  # f"onnxprune.commands.{module}": its literal head
                arg = arg.values[0]
            if fname in ("import_module", "importorskip", "find_spec", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                out.append((arg.value, 0))
    return out


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(getattr(t, "id", getattr(t, "attr", "")) in ("ImportError", "ModuleNotFoundError", "Exception",
                                                            "BaseException") for t in names)


def import_guards(path: Path) -> list[str]:
    """Places in ``path`` where a failing import of onnxprune (or of a test helper module) would be
    skipped or swallowed instead of failing: importorskip / find_spec on our module, and try blocks
    importing our module with an ImportError handler."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("importorskip", "find_spec") and any(_own(m, lv) for m, lv in _imported(node)):
                found.append(f"{path.name}:{node.lineno}: {fname} of {ast.unparse(node.args[0])}")
        elif isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            own = [m or "." for stmt in node.body for m, lv in _imported(stmt) if _own(m, lv)]
            if own:
                found.append(f"{path.name}:{node.lineno}: try/except ImportError around import of {', '.join(own)}")
    return found


def test_the_import_guard_check_catches_each_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import importlib, pytest\n"
                   "pytest.importorskip('onnxprune.structured.prune')\n"
                   "pytest.importorskip('torch')\n"
                   "try:\n    import arch_zoo\nexcept ImportError:\n    arch_zoo = None\n"
                   "try:\n    from onnxprune.training import x\nexcept (ModuleNotFoundError, OSError):\n    pass\n"
                   "try:\n    importlib.import_module('onnxprune.bridge')\nexcept Exception:\n    pass\n"
                   "try:\n    import torch\nexcept ImportError:\n    torch = None\n"
                   "ok = importlib.util.find_spec('onnxprune.bridge') is None\n"
                   "try:\n    m = importlib.import_module(f'onnxprune.commands.{name}')\nexcept ModuleNotFoundError:\n    m = 0\n")
    got = import_guards(bad)
    assert sorted(int(g.split(":")[1]) for g in got) == [2, 4, 8, 12, 20, 21], got  # not torch's two


def test_no_test_file_skips_or_swallows_a_failing_onnxprune_import():
    found = [g for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name for g in import_guards(p)]
    assert not found, "a missing onnxprune module must fail the test, not skip it:\n" + "\n".join(found)


def test_no_onnxprune_module_swallows_a_failing_import_of_its_own():
    found = [g for p in sorted((ROOT / "onnxprune").rglob("*.py")) for g in import_guards(p)]
    assert not found, "onnxprune's own modules are imported unguarded:\n" + "\n".join(found)
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "onnxprune").rglob("*.py"))
    for disguise in ("not implemented in this version", "not available in this version"):  # a rename bug's
        assert disguise not in text


# ------------------------------------------------------------------------------- runtime: loud, not "not implemented"

def _model(path: Path, out_shape=(10,)) -> Path:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    g = rng.standard_normal((int(np.prod(out_shape)), 8 * 8 * 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "G"], ["g"], transB=1, name="fc"),
             helper.make_node("Reshape", ["g", "shape"], ["y"], name="reshape")]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G"),
             numpy_helper.from_array(np.array([-1, *out_shape], np.int64), "shape")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *out_shape])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _internal_error_naming(err: str, module: str) -> bool:
    return (err.count("\n") == 1 and err.startswith("internal error: ModuleNotFoundError") and module in err
            and "not implemented" not in err and "not available" not in err)


def test_a_command_module_that_is_gone_is_a_bug_not_not_implemented(monkeypatch, tmp_path):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("ghost_cmd:ghost_cmd", "A command whose module was renamed."))
    code, out, err = run_cli("ghost", "x")
    assert code == 70 and _internal_error_naming(err, "onnxprune.commands.ghost_cmd"), err


def test_a_missing_pruning_module_is_a_bug_not_not_implemented(monkeypatch, tmp_path):
    model = _model(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxprune.structured.prune", None)  # as if renamed away
    monkeypatch.delitem(sys.modules, "onnxprune.commands.prune_cmd", raising=False)  # imported again: it needs it
    code, out, err = run_cli("prune", model, "-o", tmp_path / "s.onnx", "--structured", "--ratio", "0.5")
    assert code == 70 and _internal_error_naming(err, "onnxprune.structured.prune"), err
    assert not (tmp_path / "s.onnx").exists()


def test_a_pipeline_step_whose_module_is_gone_raises_as_a_bug(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxprune.sparsity.prune", None)
    with pytest.raises(ModuleNotFoundError, match="onnxprune.sparsity.prune"):
        steps._need("..sparsity.prune", "unstructured pruning")


def test_a_missing_optional_package_keeps_exit_3_and_the_install_line(tmp_path):
    model = _model(tmp_path / "m.onnx")
    child = ("import sys; sys.modules['torch'] = None\n"  # torch not installed
             "from onnxprune.cli import main\nmain(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", child, "finetune", str(model), "-o", str(tmp_path / "ft.onnx"),
                        "--data", "digits", "--epochs", "1"], env=subprocess_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr == "error: this needs the optional package 'torch': pip install 'onnxprune[train]'\n"
    assert not (tmp_path / "ft.onnx").exists()


# ------------------------------------------------------------------------------- eval: a missing figure says why

def test_top1_on_outputs_that_are_not_class_scores_says_why(tmp_path):
    model = _model(tmp_path / "m.onnx", out_shape=(2, 5))  # N x 2 x 5: not N x classes
    res = evaluate_outputs(str(model), "digits", "test", reference=str(model))
    assert "top1" not in res
    assert "[" in res["missing"]["top1"] and "N x classes" in res["missing"]["top1"]  # the shape, and what is needed
    why = res["missing"]["fidelity.y.top1_agreement"]
    assert why.startswith("outputs are not class scores (shape [") and "2, 5]" in why
    assert "top1_agreement" not in res["fidelity"]["y"] and res["fidelity"]["y"]["rel_l2"] == 0.0
    code, out, err = run_cli("eval", model, "--data", "digits", "--reference", model)
    assert code == 0, err
    assert "top1: not measured: " in out and "y.top1_agreement: not measured: outputs are not class scores" in out


def test_class_scores_have_no_missing_entry(tmp_path):
    model = _model(tmp_path / "m.onnx")
    res = evaluate_outputs(str(model), "digits", "test", reference=str(model))
    assert "missing" not in res and 0.0 <= res["top1"] <= 1.0 and res["fidelity"]["y"]["top1_agreement"] == 1.0


def test_why_no_top1_agreement():
    scores = np.zeros((4, 3), np.float32)
    assert why_no_top1_agreement(scores, scores) is None
    assert "no Softmax" in why_no_top1_agreement(scores, scores, scores=False)
    assert why_no_top1_agreement(np.zeros((4, 3, 2)), np.zeros((4, 3, 2))).startswith("outputs are not class scores")
    assert "int64" in why_no_top1_agreement(np.zeros((4, 3), np.int64), np.zeros((4, 3), np.int64))
    assert why_no_top1_agreement(np.zeros((0, 3)), np.zeros((0, 3))) == "no samples"


def test_unlabeled_data_says_top1_needs_labels(tmp_path):
    model = _model(tmp_path / "m.onnx")
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    res = evaluate_outputs(str(model), f"npz:{tmp_path / 'x.npz'}", "test", reference=str(model))
    assert "no labels" in res["missing"]["top1"] and "top1" not in res
    assert json.loads(json.dumps(res))["missing"] == res["missing"]
