"""Content-hashed step cache: a re-run skips every step that already finished with the same inputs.

A step's key is the SHA-256 of its name, its configuration (canonical JSON), the bytes of its input
files and the onnxprune version. A finished step's result (JSON) and the hashes of the files it
wrote are recorded in ``OUTDIR/state.json`` (rewritten atomically and fsynced after every step, so
a crash loses at most the step that was running; a run holds ``OUTDIR/.onnxprune.lock`` so that two
runs never interleave their writes; a record it cannot read is set aside as ``state.json.bak-N``,
never overwritten). On a re-run a step is skipped when its key is recorded
and its output files still hold the recorded bytes; otherwise it runs again. Changing one point's
configuration changes only the keys of that point's steps (and of the steps that read their
outputs), so only those run again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..core.errors import OnnxPruneError
from ..core.jsonio import json_default
from ..core.model_io import file_sha256, atomic_path
import socket
from ..core.version import __version__
from filelock import FileLock, Timeout
from ..profiling.provenance import machine_fingerprint

STATE_FILE = "state.json"
STATE_VERSION = 1
LOCK_FILE = ".onnxprune.lock"



class CacheMiss(Exception):
    """Raised in :meth:`StepCache.replay` mode by the first step that has no valid record."""

    def __init__(self, step: str):
        super().__init__(step)
        self.step = step


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def _host(profile: Any) -> str:
    """The machine a measuring step runs on, for people reading ``state.json``."""

    remote = getattr(profile, "remote", None)
    return f"{remote} (remote)" if remote else socket.gethostname()


def step_key(step: str, config: Any, inputs: Iterable[str | os.PathLike] = ()) -> str:
    """The content hash identifying one execution of ``step``."""

    h = hashlib.sha256()
    h.update(f"onnxprune {__version__}\n{step}\n".encode())
    h.update(canonical_json(config).encode())
    for p in inputs:
        h.update(b"\nfile:" + file_sha256(p).encode())
    return h.hexdigest()


@dataclass
class StepCache:
    """The step records of one output directory."""

    outdir: Path
    state: dict[str, Any] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)  # step names run in this process, in order
    skipped: list[str] = field(default_factory=list)  # step names answered from the record
    replayed: list[str] | None = None  # in replay mode: keys of the records answered so far
    warnings: list[str] = field(default_factory=list)  # records set aside on open (one line each)
    machine: str | None = None  # this process's machine fingerprint (computed when first needed)
    accepted: list[str] = field(default_factory=list)  # other machines whose measurements this run made (workers)
    remeasured: list[str] = field(default_factory=list)  # records from other machines measured again here

    @classmethod
    def open(cls, outdir: str | os.PathLike) -> "StepCache":
        """The records of ``outdir`` (call it holding :func:`locked`). A ``state.json`` that cannot be
        read, or one of another state version, is moved to ``state.json.bak-N`` with a warning: the
        run starts without its records but never overwrites them."""
        outdir = Path(outdir)
        path = outdir / STATE_FILE
        state: dict[str, Any] = {"version": STATE_VERSION, "steps": {}}
        warnings = []
        for stale in outdir.glob(f".{STATE_FILE}.*.tmp"):  # a save killed before its rename
            stale.unlink(missing_ok=True)
        if path.exists():
            loaded, why = _read_state(path)
            if loaded is not None:
                state = loaded
            else:
                bak = _set_aside(path)
                warnings.append(f"{path} {why}: moved to {bak.name}; this run starts without its records")
                print(f"warning: {warnings[-1]}", file=sys.stderr)
        return cls(outdir=outdir, state=state, warnings=warnings)

    @property
    def path(self) -> Path:
        return self.outdir / STATE_FILE

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The recorded result of ``key`` if its output files are intact, else None."""
        rec = self.state["steps"].get(key)
        if not isinstance(rec, dict):
            return None
        for rel, digest in rec.get("files", {}).items():
            p = self.outdir / rel
            if not p.is_file() or file_sha256(p) != digest:
                return None
        return rec.get("result")

    def run(self, step: str, config: Any, fn: Callable[[], dict[str, Any]], *,
            inputs: Iterable[str | os.PathLike] = (), outputs: Iterable[str | os.PathLike] = (),
            measures: Any = None) -> dict[str, Any]:
        """Run ``fn`` (which writes ``outputs`` and returns a JSON-able dict) unless already done.

        ``measures``: the hardware profile the step times on (``True``: this machine) -- its key then
        holds the machine fingerprint, so only a record of this machine (or of this run's workers) is reused."""
        inputs, outputs = list(inputs), [Path(o) for o in outputs]
        machines = self.machines(measures) if measures is not None else [None]
        keys = [step_key(step, config if m is None else {"config": config, "machine": m}, inputs) for m in machines]
        key, hit = keys[0], None
        for k in keys:
            hit = self.lookup(k)
            if hit is not None:
                key = k
                break
        if self.replayed is not None:
            if hit is None:
                raise CacheMiss(step)
            self.replayed.append(key)
            return hit
        if hit is not None:
            self.skipped.append(step)
            return hit
        base = step_key(step, config, inputs) if measures is not None else None
        if base is not None:
            self._note_foreign(step, base, machines)
        started = time.time()
        result = fn()
        missing = [str(o) for o in outputs if not o.is_file()]
        if missing:
            raise OnnxPruneError(f"step {step} did not write {', '.join(missing)}")
        files = {self._rel(o): file_sha256(o) for o in outputs}
        self.state["steps"][key] = {"step": step, "files": files, "result": json.loads(canonical_json(result)),
                                    "seconds": round(time.time() - started, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if base is not None:
            self.state["steps"][key].update(base=base, machine=machines[0], host=_host(measures))
        self.executed.append(step)
        self.save()
        return self.state["steps"][key]["result"]

    def own_machine(self) -> str:
        """This process's machine fingerprint."""
        if self.machine is None:
            self.machine = machine_fingerprint()
        return self.machine

    def machines(self, profile: Any = True) -> list[str]:
        """Fingerprints whose measurements on ``profile`` count as this run's, this machine first (a
        ``remote:`` profile's device has one fingerprint wherever the run is)."""
        if getattr(profile, "remote", None):
            return [machine_fingerprint(profile)]
        return list(dict.fromkeys([self.own_machine(), *self.accepted]))

    def accept(self, machine: str | None) -> None:
        """Count measurements of ``machine`` as this run's (an executor's worker that measured for it)."""
        if machine and machine not in self.accepted:
            self.accepted.append(machine)

    def _note_foreign(self, step: str, base: str, machines: list[str]) -> None:
        for rec in self.state["steps"].values():
            if isinstance(rec, dict) and rec.get("base") == base and rec.get("machine") not in machines:
                self.remeasured.append(f"step {step}: the record measured on {rec.get('host') or 'another machine'} "
                                       f"(machine {rec.get('machine')}) is not reused; measured again on this machine")
                return

    @contextmanager
    def replay(self) -> Iterator[list[str]]:
        """Answer steps only from the record, counting nothing: a step without a valid record raises
        :class:`CacheMiss` instead of running. Yields the keys answered so far (what a remote executor
        ships to the task that runs the rest, and how it finds which steps are missing)."""
        self.replayed = []
        try:
            yield self.replayed
        finally:
            self.replayed = None

    def merge(self, records: Mapping[str, Any], files: Mapping[str, bytes], executed: Iterable[str] = (),
              skipped: Iterable[str] = ()) -> None:
        """Take step records computed elsewhere (another machine's cache): their output files are
        written first (each atomically), then the records, so a crash in between loses only records."""

        for rel, data in files.items():
            dest = self.outdir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dest) as tmp:
                Path(tmp).write_bytes(data)
        self.state["steps"].update(records)
        for rec in records.values():  # the workers' machines measured for this run
            self.accept(rec.get("machine") if isinstance(rec, dict) else None)
        self.executed.extend(executed)
        self.skipped.extend(skipped)
        self.save()

    def save(self) -> None:
        self.outdir.mkdir(parents=True, exist_ok=True)
        write_durable(self.path, json.dumps(self.state, indent=1, sort_keys=True).encode())

    def _rel(self, p: Path) -> str:
        try:
            return str(p.resolve().relative_to(self.outdir.resolve()))
        except ValueError:
            return str(p.resolve())

    def counts(self) -> Mapping[str, int]:
        return {"executed": len(self.executed), "skipped": len(self.skipped)}


# ------------------------------------------------------------------------------------ the record on disk

def _read_state(path: Path) -> tuple[dict[str, Any] | None, str]:
    """This version's state record in ``path``, or None and why it is not one."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"cannot be read ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
    if not isinstance(loaded, dict) or not isinstance(loaded.get("steps"), dict):
        return None, "is not a step record"
    if loaded.get("version") != STATE_VERSION:
        return None, f"has state version {loaded.get('version')!r}, this onnxprune reads version {STATE_VERSION}"
    return loaded, ""


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to ``<name>.bak-N``, N the first free number (a link refuses an existing name,
    so no earlier backup is ever replaced)."""
    n = 1
    while True:
        bak = path.with_name(f"{path.name}.bak-{n}")
        try:
            os.link(path, bak)
        except FileExistsError:
            n += 1
            continue
        except OSError:  # no hard links on this filesystem: a checked rename (the run holds the lock)
            if bak.exists():
                n += 1
                continue
            os.rename(path, bak)
        else:
            os.unlink(path)
        _fsync_dir(path.parent)
        return bak


def write_durable(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash or power loss leaves the old or the new bytes,
    never a mix: a temporary file in the same directory, fsynced, renamed over ``path``, then the
    directory fsynced (the rename itself is only durable once the directory entry is)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; its renames are journaled by NTFS
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some network filesystems cannot fsync a directory (the file was fsynced)
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


_LOCKS: dict[str, Any] = {}  # lock path -> this process's FileLock (re-entrant: ``demo`` wraps ``run``)


@contextmanager
def locked(outdir: str | os.PathLike) -> Iterator[None]:
    """Hold ``OUTDIR/.onnxprune.lock`` for a run: another process's run on the same directory is
    refused in one line instead of interleaving (two writers of ``state.json`` drop each other's
    records). The kernel releases it when its holder dies, so a killed run never blocks the next."""

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    path = str((outdir / LOCK_FILE).resolve())
    lock = _LOCKS.setdefault(path, FileLock(path, timeout=0, thread_local=False))
    try:
        lock.acquire()
    except Timeout:
        raise OnnxPruneError(f"{outdir}: another onnxprune run is using this directory ({LOCK_FILE} is held); "
                             "wait for it to finish or choose another -o") from None
    except OSError as exc:
        raise OnnxPruneError(f"{outdir}: cannot create the run lock {LOCK_FILE} ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()
