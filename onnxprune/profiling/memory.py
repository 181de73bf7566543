"""Memory: peak resident memory of a fresh process that loads and runs the model, and GPU memory.

Measuring in the profiling process itself would count whatever it loaded before (other models,
torch, earlier profiles), and a peak never goes down. So every figure comes from a fresh
``python -m onnxprune.profiling.memprobe`` that imports the runtime, loads the model, runs it and
reports its own peak (``VmHWM`` on Linux, ``ru_maxrss`` on macOS, ``psutil``'s ``peak_wset`` on
Windows). The inputs travel as an ``.npz`` file, so the probe never parses the ONNX file itself: only
the runtime loads it. The figure includes the Python interpreter and the runtime's libraries, as a
deployed process would; the probe also reports its resident memory before loading the model, so
the model's share can be read off.

GPU memory comes from NVML (``pynvml``, from nvidia-ml-py) for the probe's own process, or else
from the backend's own figure (TensorRT engine device memory, torch's peak allocation).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..core.errors import OnnxPruneError, UnavailableError
from .hw_profile import HwProfile
import psutil

#: seconds a probe may take (a TensorRT engine build can take minutes)
PROBE_TIMEOUT_S = 900


def peak_rss_bytes() -> tuple[int, str]:
    """Peak resident memory of this process so far, and how it was read.

    Linux: ``VmHWM`` of ``/proc/self/status``, which belongs to the process image and starts anew at
    ``exec`` -- unlike ``ru_maxrss``, which a child started with fork+exec inherits from a large
    parent. Elsewhere ``ru_maxrss`` (macOS) or ``psutil``'s ``peak_wset`` (Windows).
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # lazy: Unix only (handled below)
    except ImportError:  # Windows

        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None)
        return (int(peak), "psutil peak_wset") if peak else (int(info.rss), "psutil rss (no peak available)")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (int(ru) if sys.platform == "darwin" else int(ru) * 1024), "ru_maxrss"


def current_rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def _nvml_query(query: Callable[[Any, Any], Any], device_index: int = 0) -> Any:
    """``query(pynvml, device_handle)`` between nvmlInit and nvmlShutdown; None when NVML is missing
    (no nvidia-ml-py, no driver) or the query fails."""
    try:
        import pynvml  # lazy: nvidia-ml-py ([gpu] extra)

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
        return None
    try:
        return query(pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index))
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_gpu_info(device_index: int = 0) -> dict[str, Any] | None:
    """GPU name, driver, compute capability and memory via NVML; None when NVML is unavailable."""
    def query(nvml: Any, handle: Any) -> dict[str, Any]:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        cuda = nvml.nvmlSystemGetCudaDriverVersion_v2() if hasattr(nvml, "nvmlSystemGetCudaDriverVersion_v2") else None
        return {
            "gpu": _text(nvml.nvmlDeviceGetName(handle)),
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "compute_capability": f"{major}.{minor}",
            "gpu_memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        }
    return _nvml_query(query, device_index)


def nvml_process_gpu_memory(pid: int, device_index: int = 0) -> int | None:
    """GPU memory NVML attributes to process ``pid`` (None when NVML cannot say, e.g. in some containers)."""
    def query(nvml: Any, handle: Any) -> int | None:
        return next((int(p.usedGpuMemory) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                     if p.pid == pid and p.usedGpuMemory is not None), None)
    return _nvml_query(query, device_index)


def probe_command(model: str | os.PathLike, profile: HwProfile, feeds_path: str | os.PathLike, *,
                  arena: bool = True, runs: int = 3) -> list[str]:
    """The command line of a memory probe (the profile travels as JSON, so unsaved profiles work too)."""
    return [sys.executable, "-m", "onnxprune.profiling.memprobe", "--profile-json", profile.model_dump_json(),
            "--feeds", str(feeds_path), "--arena", "on" if arena else "off", "--runs", str(runs),
            "--", str(Path(model).resolve())]  # a model named -x.onnx is a file, not an option


def measure_memory(model: str | os.PathLike, profile: HwProfile, feeds: Mapping[str, np.ndarray], *, arena: bool = True,
                   runs: int = 3, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Run a fresh memory probe on ``feeds`` and return its figures (``peak_rss_bytes``,
    ``rss_before_load_bytes``, ``method``, and ``gpu_memory_bytes`` for GPU backends)."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory(prefix="onnxprune-mem-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        names = list(feeds)  # input names may hold characters a zip member name should not
        np.savez(feeds_path, names=np.array(names, dtype=str), **{f"a{i}": np.asarray(feeds[n]) for i, n in enumerate(names)})
        cmd = probe_command(model, profile, feeds_path, arena=arena, runs=runs)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise OnnxPruneError(f"memory probe of {model} on {profile.name} took over {timeout:.0f} s") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        why = err[-1].removeprefix("error: ") if err else f"exit code {proc.returncode}"
        cls = UnavailableError if proc.returncode == UnavailableError.exit_code else OnnxPruneError
        raise cls(f"memory probe of {model} on {profile.name} failed: {why}")
    return json.loads(lines[-1])
