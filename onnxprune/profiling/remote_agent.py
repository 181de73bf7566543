"""The device side of remote profiling: ``python -m onnxprune.profiling.remote_agent TAG VERB REQUEST``.

Started by :mod:`.remote` over SSH, never by hand. ``VERB`` is ``profile`` or ``compare``, ``REQUEST``
base64 JSON; it prints one JSON line, ``{"device": {...}, "result": {...}}`` or ``{"error", "exit_code"}``.
Torch-free (the same ONNX Runtime profiler as a local run), so ``pip install onnxprune`` is enough.

It must never outlive its caller: it leads its own process group (the memory probes are children
in it) and kills that group when stdin, the SSH channel, reaches EOF -- the connection dropped or
the host gave up -- or when the request's deadline passes. ``TAG`` is only there so the host can
find and kill it by name as well.
"""
from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import signal
import socket
import sys
import threading
from typing import Any, Callable

from ..core.jsonio import json_default
import onnxruntime
from ..core.version import __version__
from .environment import cpu_model
from .api import profile_model, compare_models
from .hw_profile import profile_from_dict
from ..core.errors import OnnxPruneError


def _die(workdir: str | None) -> None:
    """Remove the session's copies (a host still there copies them again) and kill the group."""
    try:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(137)


def _watch(deadline_s: float | None, workdir: str | None) -> None:
    """Lead a process group, and kill it on stdin EOF or after ``deadline_s``."""
    try:
        os.setpgrp()
    except OSError:  # already a session leader (sshd's setsid): then also a group leader
        pass

    def stdin_eof() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        _die(workdir)

    threading.Thread(target=stdin_eof, daemon=True).start()
    if deadline_s:
        timer = threading.Timer(deadline_s, _die, (workdir,))
        timer.daemon = True
        timer.start()


def device_facts() -> dict[str, Any]:
    """What the numbers were measured on (the ``remote`` block of a result)."""


    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"host": socket.gethostname(), "platform": platform.platform(), "arch": platform.machine(),
            "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "memory_bytes": memory,
            "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
            "python": platform.python_version(), "onnxprune": __version__}


def _profile(req: dict[str, Any]) -> dict[str, Any]:
    return profile_model(req["model"], [profile_from_dict(req["profile"])], per_node=req["per_node"],
                         input_shapes=_shapes(req.get("input_shapes")), batch_sizes=req.get("batch_sizes"),
                         memory=req["memory"], top_nodes=req["top_nodes"])


def _compare(req: dict[str, Any]) -> dict[str, Any]:
    return compare_models(req["a"], req["b"], profile_from_dict(req["profile"]), batch_sizes=req.get("batch_sizes"),
                          input_shapes=_shapes(req.get("input_shapes")), memory=req["memory"])


VERBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"profile": _profile, "compare": _compare}


def _shapes(shapes: dict[str, list[int]] | None) -> dict[str, tuple[int, ...]] | None:
    return {k: tuple(v) for k, v in shapes.items()} if shapes else None


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in VERBS:
        print("usage: python -m onnxprune.profiling.remote_agent TAG {profile,compare} BASE64_JSON (started by "
              "onnxprune over SSH)", file=sys.stderr)
        return 2
    req = json.loads(base64.b64decode(argv[2]))
    _watch(req.get("deadline_s"), req.get("workdir"))
    out = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr; stdout carries only the result line

    try:
        res: dict[str, Any] = {"device": device_facts(), "result": VERBS[argv[1]](req)}
    except OnnxPruneError as exc:
        res = {"error": str(exc), "exit_code": exc.exit_code}
    except Exception as exc:  # noqa: BLE001 - reported to the host as one line, not a traceback
        res = {"error": f"internal error on the device: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
               "exit_code": 70}
    with os.fdopen(out, "w") as f:
        f.write(json.dumps(res, default=json_default) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
