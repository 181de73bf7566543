"""Profiling on the real device over SSH: the host side (transport, sessions, clean-up).

A hardware profile with ``remote: USER@HOST[:PORT]`` (or ``--remote``) is measured *on that device*:
the model and its external data files are copied with ``scp`` into a temporary directory there
(the data files under the names the model gives them; not copied again while files with the same
SHA-256 are already there), the device's own onnxprune runs the
same torch-free profiler (:mod:`.remote_agent`) and prints the usual result as JSON, and the
directory is removed when the session ends (at the end of the ``profile``/``compare`` call, or of
the recipe run, whichever scope opened it; see :func:`sessions`).

Transport is the system OpenSSH client, so ``~/.ssh/config``, the agent, keys and ProxyJump all
work. ``BatchMode=yes`` always (it comes first, and ssh keeps the first value of an option), so a
missing key or unknown host fails in one line instead of prompting. What a profile may say about
the device (destination, ssh options, ``remote_python``) is checked in :mod:`.ssh_target` when the
profile is loaded; every word that reaches the device's shell is quoted there.

Nothing is left running on the device: the agent runs as its own process group and kills that
group when its stdin (the SSH channel) reaches EOF, i.e. when the connection drops or the host side
dies; on a local timeout the host also kills it explicitly by its unique tag over a second SSH
connection, and the agent has its own deadline as a last resort.
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import re
import shlex
import subprocess
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..core.errors import OnnxPruneError, UnavailableError
from .ssh_target import Target, parse_target, remote_command, scp_argv, ssh_argv
from ..core.model_io import model_files, file_sha256
from ..core.version import __version__

AGENT_MODULE = "onnxprune.profiling.remote_agent"
#: seconds allowed for the short calls (version check, clean-up); copies get this plus 1 s per MB
SHORT_TIMEOUT_S = 60.0
#: the agent kills itself this long after the host's own timeout, should both the EOF and the kill miss
AGENT_GRACE_S = 30.0
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")
_DATA_NAME_PART = re.compile(r"[A-Za-z0-9_.+-]+")


def device_profile(profile: Any) -> dict[str, Any]:
    """The profile as the device runs it: local there, and ``real`` (it *is* the device) unless its
    ``arch`` does not match the device, which the device's own check then says."""
    data = profile.model_dump()
    for key in ("remote", "ssh_options"):
        data.pop(key, None)
    data["remote_python"] = "python3"
    if data["provenance"] == "emulated":
        data["notes"] = [*data["notes"], f"profile {profile.name} is emulated when run on a host; here it ran on the device "
                                          f"itself over SSH, so it is labelled real"]
        data["provenance"], data["emulates"] = "real", None
    return data


@dataclass(frozen=True)
class ModelFiles:
    """A model as the device gets it: the ``.onnx`` (as ``SHA.onnx``) and its external data files
    under the names the model gives them, all in one directory named by a hash of the lot, so two
    models whose data files share a name never meet."""

    key: str
    #: (absolute local path, name on the device, SHA-256); the model file first
    files: tuple[tuple[Path, str, str], ...]

    @classmethod
    def of(cls, path: Path) -> "ModelFiles":
        path = Path(path).resolve()
        model, *data = model_files(path)
        sha = file_sha256(model)
        files = [(model, f"{sha}.onnx", sha)]
        for f in data:
            files.append((f.resolve(), _data_name(path, f), file_sha256(f)))
        key = hashlib.sha256(json.dumps([[n, h] for _, n, h in files]).encode()).hexdigest()[:32]
        return cls(key, tuple(files))


def _data_name(model: Path, data: Path) -> str:
    """An external data file's name relative to its model, as the model names it; refused unless it
    is a plain relative path that the copy can keep (scp then needs no quoting on the device)."""
    try:
        parts = data.relative_to(model.parent).parts
    except ValueError:
        parts = ()
    if not parts or any(p in (".", "..") or p.startswith("-") or not _DATA_NAME_PART.fullmatch(p) for p in parts):
        raise OnnxPruneError(f"{model}: external data file {str(data)!r} cannot be copied to the device under the "
                             "name the model gives it (only letters, digits and _ . + - inside the model's folder); "
                             "save the model with a plain external data name (onnx.save_model(..., location=NAME))")
    return "/".join(parts)


# --------------------------------------------------------------------------------------------- session

_HELLO = r"""
import base64, hashlib, importlib.util, json, os, re, sys, tempfile
req = json.loads(base64.b64decode(sys.argv[1]))
out = {"python": sys.version.split()[0], "version": None}
try:  # the version line, without importing the package (seconds on a small board)
    spec = importlib.util.find_spec("onnxprune")
    if spec is None or not spec.origin:
        raise ImportError("No module named 'onnxprune'")
    text = ""
    for name in (os.path.join(os.path.dirname(spec.origin), "core", "version.py"), spec.origin):
        if os.path.isfile(name):
            with open(name, encoding="utf-8") as f:
                text += f.read() + "\n"
    m = re.search(r"^__version__ = [\"']([^\"']+)[\"']", text, re.M)
    if m:
        out["version"] = m.group(1)
    else:
        import onnxprune
        out["version"] = onnxprune.__version__
except Exception as exc:
    out["import_error"] = "%s: %s" % (type(exc).__name__, exc)

def same(p, sha):
    if not os.path.isfile(p):
        return False
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() == sha

if out["version"] == req["version"]:
    d = os.path.join(tempfile.gettempdir(), req["dirname"])
    os.makedirs(d, mode=0o700, exist_ok=True)
    out["workdir"], out["have"] = d, []
    for key, files in req["models"].items():
        for name, sha in files:
            os.makedirs(os.path.dirname(os.path.join(d, key, name)), mode=0o700, exist_ok=True)
        if all(same(os.path.join(d, key, name), sha) for name, sha in files):
            out["have"].append(key)
print(json.dumps(out))
"""


def _b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def _ssh_error(stderr: str) -> str:
    """The line of ssh's stderr that says what went wrong, with a hint for the common cases."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently added")]
    line = lines[-1].removeprefix("ssh: ") if lines else "connection failed"
    if "Permission denied" in line:
        line += ("; BatchMode allows no password prompt: install a key on the device (ssh-copy-id) or pass "
                 "--ssh-option IdentityFile=PATH")
    elif "Host key verification failed" in line:
        line += "; connect once with ssh to accept the device's host key (or --ssh-option StrictHostKeyChecking=accept-new)"
    return line


class RemoteSession:
    """One device: its temporary directory and the agent calls made there."""

    def __init__(self, target: Target, python: str, options: Sequence[str]):
        self.target, self.python, self.options = target, python, list(options)
        self.dirname = f"onnxprune-remote-{uuid.uuid4().hex[:12]}"
        self.workdir: str | None = None

    def __str__(self) -> str:
        return f"remote {self.target}"

    # ---- transport -------------------------------------------------------------------------
    def _ssh(self, command: str, timeout: float, what: str, tag: str | None = None) -> tuple[int, str, str]:
        """Run ``command`` on the device. Its stdin is a pipe this process holds open until the call
        ends, so the device side sees EOF whenever the call ends, however it ends."""
        rfd, wfd = os.pipe()
        try:
            proc = subprocess.Popen(ssh_argv(self.target, self.options, command), stdin=rfd, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        except FileNotFoundError:
            os.close(wfd)
            raise UnavailableError(f"{self}: the OpenSSH client 'ssh' is not installed here") from None
        finally:
            os.close(rfd)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            if tag:
                self.kill_agent(tag)
            raise UnavailableError(f"{self}: {what} did not finish within {timeout:g} s; it was stopped and the "
                                   f"process on the device killed (remote_timeout_s sets the limit)") from None
        except BaseException:  # Ctrl-C: leave nothing running there either
            proc.kill()
            proc.communicate()
            if tag:
                self.kill_agent(tag)
            raise
        finally:
            os.close(wfd)
        if proc.returncode == 255:  # ssh's own failure: auth, host, network, dropped connection
            if tag:
                self.kill_agent(tag)
            raise UnavailableError(f"{self}: ssh: {_ssh_error(err)}")
        return proc.returncode, out, err

    def kill_agent(self, tag: str) -> None:
        """Kill the agent tagged ``tag`` and its process group (best effort; the bracket keeps the
        pattern from matching this clean-up shell's own command line)."""
        pattern = shlex.quote(f"[{tag[0]}]{tag[1:]}")
        cmd = (f"for p in $(pgrep -f {pattern} 2>/dev/null); do kill -KILL -- -$p 2>/dev/null || kill -KILL $p "
               f"2>/dev/null; done; true")
        try:
            subprocess.run(ssh_argv(self.target, self.options, cmd), stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=SHORT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass

    # ---- steps -------------------------------------------------------------------------------
    def upload(self, paths: Sequence[Path]) -> dict[Path, tuple[str, bool]]:
        """Each local model's path on the device and whether it was copied (False: its files, with
        the same SHA-256, were already there). Checks the device's onnxprune version first."""

        bundles = {p: ModelFiles.of(p) for p in paths}
        req = {"version": __version__, "dirname": self.dirname,
               "models": {b.key: [[name, sha] for _, name, sha in b.files] for b in bundles.values()}}
        rc, out, err = self._ssh(remote_command(self.python, "-c", _HELLO, _b64(req)), SHORT_TIMEOUT_S, "connecting")
        hello = _last_json(out)
        if hello is None:
            last = (err.strip().splitlines() or [f"exit status {rc}"])[-1]
            if rc == 127:
                last = f"{self.python!r} not found on the device ({last}); set remote_python to the device's Python"
            raise UnavailableError(f"{self}: could not run Python on the device: {last}")
        if hello["version"] is None:
            raise UnavailableError(f"{self}: onnxprune is not installed for {self.python} on the device "
                                   f"({hello.get('import_error')}); run 'pip install onnxprune=={__version__}' there "
                                   "(no torch needed) or set remote_python to a venv's python")
        if hello["version"] != __version__:
            raise UnavailableError(f"{self}: onnxprune version mismatch: {__version__} here, {hello['version']} on the "
                                   f"device; install the same version on both (pip install onnxprune=={__version__})")
        self.workdir = hello["workdir"]
        if not _SAFE_PATH.match(self.workdir):
            raise UnavailableError(f"{self}: the device's temporary directory {self.workdir!r} has characters scp "
                                   "would need quoted; set TMPDIR there to a plain path")
        placed: dict[Path, tuple[str, bool]] = {}
        copied: set[str] = set()
        for p, b in bundles.items():
            copy = b.key not in hello["have"] and b.key not in copied
            if copy:
                for local, name, _ in b.files:
                    self._scp(local, f"{self.workdir}/{b.key}/{name}")
                copied.add(b.key)
            placed[p] = (f"{self.workdir}/{b.key}/{b.files[0][1]}", copy)
        return placed

    def _scp(self, src: Path, dest: str) -> None:
        timeout = SHORT_TIMEOUT_S + src.stat().st_size / 1e6
        try:
            proc = subprocess.run(scp_argv(self.target, self.options, src, dest), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise UnavailableError(f"{self}: the OpenSSH client 'scp' is not installed here") from None
        except subprocess.TimeoutExpired:
            raise UnavailableError(f"{self}: copying {src} did not finish within {timeout:.0f} s") from None
        if proc.returncode:
            raise UnavailableError(f"{self}: copying {src} failed: {_ssh_error(proc.stderr)}")

    def call(self, verb: str, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Run the agent's ``verb`` on the device; its JSON result, or its error raised here."""
        tag = f"onnxprune-agent-{uuid.uuid4().hex}"
        req = {**request, "deadline_s": timeout + AGENT_GRACE_S, "workdir": self.workdir}
        cmd = "exec " + remote_command(self.python, "-m", AGENT_MODULE, tag, verb, _b64(req))
        rc, out, err = self._ssh(cmd, timeout, verb, tag=tag)
        res = _last_json(out)
        if res is None:
            last = (err.strip().splitlines() or [f"exit status {rc}"])[-1]
            raise UnavailableError(f"{self}: the device's {verb} ended without a result ({last}); the connection may "
                                   "have dropped or the device restarted")
        if "error" in res:
            cls = UnavailableError if res.get("exit_code") == 3 else OnnxPruneError
            err_obj = cls(f"{self}: {res['error']}")
            if res.get("exit_code") not in (1, 3):
                err_obj.exit_code = res.get("exit_code") or 1
            raise err_obj
        return res

    def close(self) -> None:
        """Remove the device's temporary directory (best effort: a device that went away keeps it
        in its temporary directory, which it clears on reboot)."""
        if self.workdir is None:
            return
        try:
            subprocess.run(ssh_argv(self.target, self.options, f"rm -rf -- {shlex.quote(self.workdir)}"),
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=SHORT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.workdir = None


def _last_json(out: str) -> dict[str, Any] | None:
    for line in reversed(out.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


# ------------------------------------------------------------------------------------- session scope

_lock = threading.RLock()
_sessions: dict[tuple, RemoteSession] = {}
_depth = 0


@contextmanager
def sessions() -> Iterator[None]:
    """A scope in which each device keeps its temporary directory (models copied once); the
    outermost scope removes them on exit. ``profile_model``/``compare_models`` open one per call;
    a caller that profiles many times (a recipe run) opens one around all of it."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            done = list(_sessions.values()) if _depth == 0 else []
            if done:
                _sessions.clear()
        for s in done:
            s.close()


def close_all() -> None:
    with _lock:
        done = list(_sessions.values())
        _sessions.clear()
    for s in done:
        s.close()


atexit.register(close_all)


def session_for(profile: Any) -> RemoteSession:
    key = (profile.remote, profile.remote_python, tuple(profile.ssh_options))
    with _lock:
        if key not in _sessions:
            _sessions[key] = RemoteSession(parse_target(profile.remote), profile.remote_python, profile.ssh_options)
        return _sessions[key]


# ------------------------------------------------------------------------------------------- the API

def _remote_block(session: RemoteSession, device: Mapping[str, Any], copied: Mapping[str, bool]) -> dict[str, Any]:
    return {"target": str(session.target), **device, "workdir": session.workdir, "model_copied": dict(copied)}


def profile_remote(path: Path, profile: Any, *, per_node: bool, input_shapes: Mapping[str, tuple[int, ...]] | None,
                   batch_sizes: Sequence[int] | None, memory: bool, top_nodes: int) -> dict[str, Any]:
    """``profile_model`` of one profile, run on its device; records gain ``remote``."""
    with sessions():
        s = session_for(profile)
        (dest, copied), = s.upload([path]).values()
        res = s.call("profile", {"model": dest, "profile": device_profile(profile), "per_node": per_node,
                                 "input_shapes": _shapes(input_shapes), "batch_sizes": list(batch_sizes or []) or None,
                                 "memory": memory, "top_nodes": top_nodes}, profile.remote_timeout_s)
        block = _remote_block(s, res["device"], {str(path): copied})
    out = res["result"]
    out["model"] = str(path)
    for rec in out["results"]:
        rec["profile_source"] = profile.source
        rec["remote"] = block
    return out


def compare_remote(a: Path, b: Path, profile: Any, *, batch_sizes: Sequence[int] | None,
                   input_shapes: Mapping[str, tuple[int, ...]] | None, memory: bool) -> dict[str, Any]:
    """``compare_models`` on the device: both models copied, timed interleaved in one process there."""
    with sessions():
        s = session_for(profile)
        placed = s.upload([a, b])
        res = s.call("compare", {"a": placed[a][0], "b": placed[b][0], "profile": device_profile(profile),
                                 "batch_sizes": list(batch_sizes or []) or None, "input_shapes": _shapes(input_shapes),
                                 "memory": memory}, profile.remote_timeout_s)
        block = _remote_block(s, res["device"], {str(a): placed[a][1], str(b): placed[b][1]})
    out = res["result"]
    out["a"]["model"], out["b"]["model"] = str(a), str(b)
    out["remote"] = block
    return out


def _shapes(shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, list[int]] | None:
    return {k: [int(d) for d in v] for k, v in shapes.items()} if shapes else None
