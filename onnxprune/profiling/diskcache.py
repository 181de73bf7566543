"""onnxprune's cache directory on disk (measured latency tables), its size bound, and clearing it.

The directory is ``$ONNXPRUNE_CACHE_DIR`` when set, else the platform's user cache directory
(``platformdirs.user_cache_dir("onnxprune")``: ``$XDG_CACHE_HOME/onnxprune`` or
``~/.cache/onnxprune`` on Linux, ``~/Library/Caches/onnxprune`` on macOS, ``%LOCALAPPDATA%`` on
Windows). Entries are bounded to ``$ONNXPRUNE_CACHE_MAX_MB`` (default :data:`DEFAULT_MAX_MB`):
after each write the least recently used entries (by modification time; a hit touches its file)
are removed until the total fits. ``onnxprune cache info`` / ``onnxprune cache clear`` show and empty it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..core.errors import OnnxPruneError
import platformdirs

ENV_DIR = "ONNXPRUNE_CACHE_DIR"
ENV_MAX_MB = "ONNXPRUNE_CACHE_MAX_MB"
DEFAULT_MAX_MB = 256.0
#: the kinds of entries kept, one folder each
KINDS = ("latency",)


def cache_root() -> Path:
    """``$ONNXPRUNE_CACHE_DIR``, else the platform's user cache directory for onnxprune."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)

    return Path(platformdirs.user_cache_dir("onnxprune", appauthor=False))


def kind_dir(kind: str = "latency") -> Path:
    return cache_root() / kind


def max_bytes() -> int:
    """The size bound in bytes (``$ONNXPRUNE_CACHE_MAX_MB``, a non-negative number of MiB)."""
    text = os.environ.get(ENV_MAX_MB)
    if text is None or not text.strip():
        return int(DEFAULT_MAX_MB * 2**20)
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:  # also refuses nan
        raise OnnxPruneError(f"{ENV_MAX_MB}={text!r}: expected a size in MiB, a number >= 0 (default {DEFAULT_MAX_MB:g})")
    return int(mb * 2**20)


def touch(path: str | os.PathLike) -> None:
    """Mark an entry as just used (its modification time orders eviction; atime is often off)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _entries(kind: str) -> list[tuple[Path, int, float]]:
    """(path, bytes, mtime) of every entry of ``kind``, oldest first."""
    d = kind_dir(kind)
    out = []
    for p in d.glob("*.json") if d.is_dir() else []:
        try:
            st = p.stat()
        except OSError:
            continue  # removed by another process meanwhile
        out.append((p, st.st_size, st.st_mtime))
    return sorted(out, key=lambda e: e[2])


def enforce_bound(kind: str = "latency", keep: str | os.PathLike | None = None) -> list[Path]:
    """Remove the least recently used entries until the total fits :func:`max_bytes`; ``keep`` (the
    entry just written) is never removed. Returns the removed paths."""
    limit = max_bytes()
    entries = _entries(kind)
    total = sum(size for _, size, _ in entries)
    removed = []
    keep_path = Path(keep).resolve() if keep is not None else None
    for path, size, _ in entries:
        if total <= limit:
            break
        if keep_path is not None and path.resolve() == keep_path:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed


def info() -> dict[str, Any]:
    """Where the cache is, how many entries and bytes each kind holds, and the bound."""
    kinds = {}
    for kind in KINDS:
        entries = _entries(kind)
        kinds[kind] = {"path": str(kind_dir(kind)), "entries": len(entries), "bytes": sum(s for _, s, _ in entries)}
    return {"path": str(cache_root()), "max_bytes": max_bytes(), "bytes": sum(k["bytes"] for k in kinds.values()),
            "kinds": kinds}


def clear() -> dict[str, Any]:
    """Remove every entry (and half-written leftovers) onnxprune keeps; other files are left alone."""
    removed, freed = 0, 0
    for kind in KINDS:
        d = kind_dir(kind)
        if not d.is_dir():
            continue
        for path, size, _ in _entries(kind):
            try:
                path.unlink()
            except OSError:
                continue
            removed, freed = removed + 1, freed + size
        for tmp in d.glob(".*.json.*"):  # atomic-write folders a killed process left behind
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(cache_root()), "removed": removed, "bytes_freed": freed}
