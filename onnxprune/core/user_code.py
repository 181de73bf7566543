"""Import a user's function from ``module:function`` specs (data loaders, PyTorch model factories).

Users point onnxprune at their own code; whatever goes wrong there (missing file, import error,
typo in the name) must come back as one line naming the spec, not a traceback from their module.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import OnnxPruneError


def import_callable(modname: str, fname: str, label: str, *, namespace: str) -> Callable:
    """``modname`` is a dotted module (also searched from the working directory) or a ``.py`` path.

    ``label`` starts every error line (e.g. ``"--torch 'm:f'"``); ``namespace`` prefixes the
    module name a file is loaded under, so two files with the same stem don't collide with user
    packages.
    """
    try:
        if modname.endswith(".py") or "/" in modname or os.sep in modname:
            path = Path(modname).expanduser()
            if not path.exists():
                raise OnnxPruneError(f"{label}: no such file {path}")
            spec = importlib.util.spec_from_file_location(f"{namespace}_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:  # "" already means the working directory
                sys.path.insert(0, os.getcwd())
            mod = importlib.import_module(modname)
    except OnnxPruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: one line, no traceback
        raise OnnxPruneError(f"{label}: cannot import {modname!r} ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    fn = getattr(mod, fname, None)
    if not callable(fn):
        raise OnnxPruneError(f"{label}: {modname!r} has no callable {fname!r}")
    return fn
