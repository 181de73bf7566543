"""The package layers of docs/architecture.md hold: no upward import, no cycle, lazy imports only
for optional dependencies."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "onnxprune"

#: Third-party packages that are optional extras (or slow to import and needed only by one command):
#: the only ones a function may import locally.
OPTIONAL = {"torch", "torch_pruning", "sklearn", "ray", "matplotlib", "tensorrt", "pynvml", "PIL", "tokenizers"}
#: parts of required packages that take seconds to import (sympy) and serve one command
SLOW = ("onnxruntime.tools", "onnxruntime.transformers", "onnxruntime.quantization")


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed ('[dev]' extra)")
def test_import_contracts_hold():
    proc = subprocess.run([shutil.which("lint-imports"), "--config", str(ROOT / ".importlinter"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _local_imports():
    """(path, import node, lines, guarded) for every import inside a function; ``guarded``: inside a
    ``try`` that handles ImportError (a platform module such as ``resource``, a tool that may be missing)."""
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        lines = path.read_text().splitlines()
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   and any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in t.handlers)
                   for b in t.body for n in ast.walk(b)}
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield path, node, lines, id(node) in guarded


def test_function_local_imports_are_optional_dependencies_with_a_reason():
    bad = []
    for path, node, lines, guarded in _local_imports():
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            names = [("." * node.level) + (node.module or "")]
        text = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
        for name in names:
            top = name.split(".")[0]
            if top in OPTIONAL or name.startswith(".") or name.startswith(SLOW) or guarded:
                if "#" not in text:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: local import of {name} without a comment saying why")
                continue
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: local import of {name} (not an optional dependency)")
    assert not bad, "\n".join(bad[:60]) + f"\n... {len(bad)} in all"
