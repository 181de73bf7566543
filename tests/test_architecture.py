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


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed ('[dev]' extra)")
def test_import_contracts_hold():
    proc = subprocess.run([shutil.which("lint-imports"), "--config", str(ROOT / ".importlinter"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _local_imports():
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        lines = path.read_text().splitlines()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield path, node, lines


def test_function_local_imports_are_optional_dependencies_with_a_reason():
    bad = []
    for path, node, lines in _local_imports():
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            names = [("." * node.level) + (node.module or "")]
        text = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
        for name in names:
            top = name.split(".")[0]
            if top in OPTIONAL or name.startswith("."):
                if "#" not in text:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: local import of {name} without a comment saying why")
                continue
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: local import of {name} (not an optional dependency)")
    assert not bad, "\n".join(bad[:60]) + f"\n... {len(bad)} in all"
