"""Where and how a number was measured: the ``measured_on`` record and the machine fingerprint.

Every latency/memory result carries ``measured_on`` (host, CPU model, cores, GPU and driver,
runtime versions, the threads the runtime actually used, and whether the machine was ``exclusive``
or ``shared`` while the clock ran). Every cache that stores a measurement keys it by
:func:`machine_fingerprint`, so a figure taken on another machine is measured again, never replayed.

Co-tenancy is judged from CPU time, not guessed: around the timing window the machine's busy CPU
time (``psutil.cpu_times``: user, nice, system, irq, softirq, and a hypervisor's steal) is read
before and after, this process's own CPU time is subtracted, and what is left, divided by the
window, is how many cores *others* kept busy. At :data:`SHARED_CORES` or more the measurement was
``shared``. The 1-minute load averages before and after and the busiest other processes are kept as
evidence. On a GPU profile, another process holding the GPU (NVML) also makes it ``shared``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .environment import _version, cpu_model, physical_cores, gpu_facts
from .measure import usable_cores
from .memory import nvml_gpu_info, _nvml_query
import psutil

#: others keeping this many cores busy (on average over the timing window) make a measurement ``shared``
SHARED_CORES = 0.25
#: a window shorter than this is extended by idle sampling (the kernel counts CPU time in 10 ms ticks)
MIN_WINDOW_S = 0.1
#: other processes at or above this many cores in the window are named in the evidence
BUSY_PROCESS_CORES = 0.1
#: fields of psutil.cpu_times() that are CPU work (guest time is already inside user on Linux)
_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


# ---- the machine -------------------------------------------------------------------------------
def _nvidia_proc() -> dict[str, Any] | None:
    """GPU names and driver from ``/proc/driver/nvidia`` (Linux, no library needed)."""
    root = Path("/proc/driver/nvidia")
    try:
        version = (root / "version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    driver = next((tok for tok in version.split() if tok[:1].isdigit() and "." in tok), None)
    names = []
    for info in sorted((root / "gpus").glob("*/information")):
        for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.split(":", 1)[0].strip() == "Model":
                names.append(line.split(":", 1)[1].strip())
    return {"gpu": names[0] if names else None, "gpu_count": len(names), "gpu_driver": driver}


def _nvml() -> dict[str, Any] | None:
    info = nvml_gpu_info()
    if info is None:
        return None
    try:
        import pynvml  # lazy: nvidia-ml-py ([gpu] extra)

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        count = 1
    return {"gpu": info.get("gpu"), "gpu_count": count, "gpu_driver": info.get("driver")}


@functools.lru_cache(maxsize=1)
def machine_facts() -> dict[str, Any]:
    """What decides a measurement's numbers on this machine (cheap: no torch import; cached).

    The GPU comes from NVML, else ``/proc/driver/nvidia``; ``default_threads`` is the intra-op
    thread count a profile leaving ``threads.intra_op`` at 0 gets here (the runtimes' default: the
    physical cores this process may use)."""
    gpu = _nvml() or _nvidia_proc() or {"gpu": None, "gpu_count": 0, "gpu_driver": None}
    usable = len(usable_cores())
    physical = physical_cores()
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": {"logical": os.cpu_count(), "physical": physical, "usable": usable},
        **gpu,
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt_cu12"),
        "torch": _version("torch"),
        "default_threads": min(physical, usable),
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def machine_fingerprint(profile: Any = None) -> str:
    """A short hash of :func:`machine_facts` (host, CPU model, cores, GPU and driver, runtime
    versions, default threads): the part of every measurement cache key that names the machine.

    A ``remote:`` profile measures on its device, not here: its fingerprint is the device address
    (the agent's ``measured_on`` names the device itself)."""
    remote = getattr(profile, "remote", None)
    if remote:
        return "remote-" + _digest({"remote": remote})
    return _digest(machine_facts())


# ---- threads actually used ---------------------------------------------------------------------
def runner_threads(runner: Any, profile: Any) -> dict[str, Any]:
    """The threads ``runner`` really runs with, read from the runtime itself (call before ``close``).

    ONNX Runtime: its session options (0 means its default, the physical cores usable here);
    torch: ``torch.get_num_threads()`` while the runner holds its setting; TensorRT: the engine runs
    on the GPU, so no host thread pool is reported."""
    session = getattr(runner, "session", None)
    if session is not None and hasattr(session, "get_session_options"):
        so = session.get_session_options()
        intra, inter = int(so.intra_op_num_threads), int(so.inter_op_num_threads)
        default = machine_facts()["default_threads"]
        asked = getattr(getattr(profile, "threads", None), "intra_op", None)
        why = (f" (0 = default: {default} physical core(s) usable here)" if not intra else
               f" (the profile's 0 = the {intra} physical core(s) usable here)" if asked == 0 else "")
        return {"intra_op": intra or default, "inter_op": inter or 1, "source": "onnxruntime session options" + why}
    torch = sys.modules.get("torch") if str(getattr(profile, "backend", "")).startswith("torch") else None
    if torch is not None:  # torch's thread pool is per process: what the runner set is what this reads
        return {"intra_op": int(torch.get_num_threads()), "inter_op": int(torch.get_num_interop_threads()),
                "source": "torch.get_num_threads() during the timing"}
    if getattr(runner, "backend", None) == "tensorrt" or getattr(profile, "backend", None) == "tensorrt":
        return {"intra_op": None, "inter_op": None, "source": "TensorRT engine on the GPU (no host thread pool)"}
    threads = getattr(profile, "threads", None)
    return {"intra_op": getattr(threads, "intra_op", None), "inter_op": getattr(threads, "inter_op", None),
            "source": "the profile (the runtime did not say)"}


# ---- co-tenancy --------------------------------------------------------------------------------
def _busy(times: Any) -> float:
    return sum(getattr(times, f, 0.0) for f in _BUSY_FIELDS)


def _own(proc: Any) -> float:
    t = proc.cpu_times()
    return t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)


def _processes() -> dict[int, tuple[str, float]]:
    me = os.getpid()
    out = {}
    for p in psutil.process_iter(["pid", "name", "cpu_times"]):
        info = p.info
        if info["pid"] == me or info.get("cpu_times") is None:
            continue
        out[info["pid"]] = (info.get("name") or "?", info["cpu_times"].user + info["cpu_times"].system)
    return out


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _gpu_others() -> int | None:
    """Processes other than this one holding GPU 0, from NVML; None when NVML cannot say (no NVML, or
    its pids are not this container's)."""

    def query(nvml: Any, handle: Any) -> int | None:
        pids = [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        if os.getpid() not in pids:  # we hold the GPU, so NVML sees another pid namespace (a container)
            return None
        return sum(1 for pid in pids if pid != os.getpid())
    return _nvml_query(query)


@dataclass
class Observation:
    """CPU (and GPU) use by others around one timing window; :meth:`judge` says exclusive or shared."""

    gpu: bool = False
    window_s: float = 0.0
    others_cores: float | None = None
    load_before: float | None = None
    load_after: float | None = None
    busy: list[dict[str, Any]] = field(default_factory=list)
    gpu_others: int | None = None
    method: str = "cpu-time"
    _start: tuple = ()

    def start(self) -> "Observation":
        self.load_before = _loadavg()
        try:
            proc = psutil.Process()
            self._start = (time.monotonic(), _busy(psutil.cpu_times()), _own(proc), _processes(), proc)
        except Exception:  # noqa: BLE001 - no psutil figures: judged from the load average
            self._start = (time.monotonic(),)
        return self

    def stop(self) -> None:
        if len(self._start) < 5:
            self.window_s = time.monotonic() - self._start[0]
            self.load_after, self.method = _loadavg(), "load-average"
            return
        t0, busy0, own0, procs0, proc = self._start
        if time.monotonic() - t0 < MIN_WINDOW_S:  # too short for 10 ms ticks: watch a little longer (we are idle)
            time.sleep(MIN_WINDOW_S - (time.monotonic() - t0))

        busy1, own1, procs1 = _busy(psutil.cpu_times()), _own(proc), _processes()
        self.window_s = time.monotonic() - t0
        self.load_after = _loadavg()
        self.others_cores = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / self.window_s, 3)
        deltas = [(cpu1 - procs0[pid][1], pid, name) for pid, (name, cpu1) in procs1.items() if pid in procs0]
        self.busy = [{"pid": pid, "name": name, "cores": round(d / self.window_s, 2)}
                     for d, pid, name in sorted(deltas, reverse=True)[:5] if d / self.window_s >= BUSY_PROCESS_CORES]
        if self.gpu:
            self.gpu_others = _gpu_others()

    def judge(self) -> dict[str, Any]:
        """``{"co_tenancy": "exclusive" | "shared", "co_tenancy_basis": {...}}``."""
        basis: dict[str, Any] = {"method": self.method, "window_s": round(self.window_s, 3),
                                 "load_avg_1m": [self.load_before, self.load_after]}
        if self.others_cores is not None:
            shared = self.others_cores >= SHARED_CORES
            basis.update(others_cores=self.others_cores, threshold_cores=SHARED_CORES, busy_processes=self.busy)
            why = (f"other processes kept {self.others_cores:.2f} core(s) busy during the {self.window_s:.2f} s timing "
                   f"({'>=' if shared else '<'} {SHARED_CORES})")
        else:  # no psutil: the load average (which counts our own threads too) against the usable cores
            load = self.load_after if self.load_after is not None else 0.0
            shared = load > machine_facts()["cores"]["usable"]
            why = f"1-minute load average {load} {'>' if shared else '<='} {machine_facts()['cores']['usable']} usable core(s)"
        if self.gpu:
            basis["gpu_other_processes"] = self.gpu_others
            if self.gpu_others:
                shared = True
                why += f"; {self.gpu_others} other process(es) held the GPU"
            elif self.gpu_others is None:
                why += "; GPU sharing not checked (no NVML)"
        basis["reason"] = why
        return {"co_tenancy": "shared" if shared else "exclusive", "co_tenancy_basis": basis}


@contextlib.contextmanager
def observe(profile: Any = None) -> Iterator[Observation]:
    """Watch the machine while the block (one timing) runs; read the verdict with ``.judge()`` after."""
    obs = Observation(gpu=bool(getattr(profile, "is_gpu", False))).start()
    try:
        yield obs
    finally:
        obs.stop()


# ---- the record --------------------------------------------------------------------------------
def measured_on(profile: Any, threads: Mapping[str, Any], observation: Observation) -> dict[str, Any]:
    """The ``measured_on`` record of one measurement on ``profile`` (see the module docstring)."""
    facts = machine_facts()
    gpu, driver = facts["gpu"], facts["gpu_driver"]
    if getattr(profile, "is_gpu", False) and gpu is None:  # e.g. a Jetson without NVML: ask the fuller probe

        more = gpu_facts() or {}
        gpu, driver = more.get("gpu"), more.get("driver")
    backend = getattr(profile, "backend", None)
    return {
        "host": facts["host"], "cpu_model": facts["cpu_model"], "cores": dict(facts["cores"]),
        "gpu": gpu, "gpu_driver": driver,
        "onnxruntime": facts["onnxruntime"], "tensorrt": facts["tensorrt"],
        **({"torch": facts["torch"]} if str(backend).startswith("torch") else {}),
        "backend": backend, "threads": dict(threads),
        **observation.judge(),
        "fingerprint": machine_fingerprint(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def merge_measured_on(records: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """One record for several measurements (seeds, batch sizes, interleaved runs): the first one's
    facts; ``shared`` if any was shared (the basis says how many); ``hosts`` when they differ."""
    recs = [dict(r) for r in records if r]
    if not recs:
        return None
    out = dict(recs[0])
    if len(recs) == 1:
        return out
    shared = [r for r in recs if r.get("co_tenancy") == "shared"]
    out["co_tenancy"] = "shared" if shared else "exclusive"
    basis = dict((shared or recs)[0].get("co_tenancy_basis") or {})
    basis["reason"] = f"{len(shared)} of {len(recs)} timings shared" + (f"; first: {basis['reason']}" if shared and basis.get("reason") else "")
    out["co_tenancy_basis"] = basis
    fps = list(dict.fromkeys(r.get("fingerprint") for r in recs))
    if len(fps) > 1:
        out["hosts"] = list(dict.fromkeys(r.get("host") for r in recs))
        out["fingerprints"] = fps
    return out


def measured_on_line(rec: Mapping[str, Any] | None) -> str:
    """``measured_on`` in one line (reports, CLI)."""
    if not rec:
        return "measured on: not recorded"
    cores = rec.get("cores") or {}
    gpu = f", {rec['gpu']} (driver {rec.get('gpu_driver') or '?'})" if rec.get("gpu") else ""
    thr = rec.get("threads") or {}
    threads = f"{thr['intra_op']} intra-op thread(s)" if thr.get("intra_op") is not None else "threads n/a (GPU engine)"
    runtimes = f"onnxruntime {rec.get('onnxruntime')}" + (f", TensorRT {rec['tensorrt']}" if rec.get("tensorrt") else "")
    hosts = f" (hosts: {', '.join(rec['hosts'])})" if rec.get("hosts") else ""
    basis = (rec.get("co_tenancy_basis") or {}).get("reason", "")
    return (f"measured on {rec.get('host')}{hosts}: {rec.get('cpu_model')}, {cores.get('usable')}/{cores.get('logical')} "
            f"cores usable{gpu}; {runtimes}; {threads}; {rec.get('co_tenancy')}" + (f" ({basis})" if basis else ""))
