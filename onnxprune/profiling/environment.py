"""What a result was measured on: library versions, CPU, GPU, and the provenance actually earned."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from .hw_profile import HwProfile
from .measure import usable_cores
import psutil
from .memory import nvml_gpu_info
import numpy
import onnx
import onnxruntime

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def _arch(name: str) -> str:
    return _ARCH_ALIASES.get(name.lower(), name.lower())


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):
        for line in text.splitlines():
            if line.split(":", 1)[0].strip() == key and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def physical_cores() -> int:
    try:
        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # noqa: BLE001
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def gpu_facts() -> dict[str, Any] | None:
    """GPU name, driver and compute capability (NVML, else torch); None without a visible GPU."""

    info = nvml_gpu_info()
    if info is not None:
        return info
    try:  # Jetson boards have no full NVML; torch still knows the device
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "driver": None, "cuda_driver": None,
                    "compute_capability": f"{major}.{minor}", "gpu_memory_total_bytes": None}
    except Exception:  # noqa: BLE001
        pass
    return None


def versions(profile: HwProfile) -> dict[str, Any]:
    """Versions of everything that decides the numbers, for ``profile``'s backend."""

    out: dict[str, Any] = {
        "onnxprune": _version("onnxprune"),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": physical_cores(),
        "cpu_cores_usable": len(usable_cores()),
    }
    if profile.backend.startswith("torch"):
        out["torch"] = _version("torch")
    if profile.backend == "tensorrt":
        out["tensorrt"] = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt_cu12")
    if profile.is_gpu:
        facts = gpu_facts() or {}
        for key in ("gpu", "driver", "cuda_driver", "compute_capability"):
            out[key] = facts.get(key)
    if profile.backend == "ort-cuda":
        out["onnxruntime_gpu"] = _version("onnxruntime-gpu")
        out["onnxruntime_build"] = onnxruntime.get_build_info()  # names the CUDA/cuDNN it was built with
    elif profile.backend in ("tensorrt", "torch-cuda"):
        import torch  # present: both backends need it

        out["cuda_runtime"] = torch.version.cuda
    return out


def effective_provenance(profile: HwProfile, vers: dict[str, Any]) -> tuple[str, list[str]]:
    """The provenance the result has earned: a ``real`` profile measured on another CPU architecture
    or another GPU than it was written for is ``emulated``, and the notes say why."""
    notes: list[str] = []
    prov = profile.provenance
    if profile.arch and _arch(profile.arch) != _arch(platform.machine()):
        notes.append(f"profile {profile.name} is written for {profile.arch} but ran on {platform.machine()}")
        prov = "emulated"
    if profile.gpu is not None:
        cc = vers.get("compute_capability")
        if cc is None:
            notes.append(f"could not read this GPU's compute capability to check it is a {profile.gpu.name or profile.gpu.compute_capability}")
        elif cc != profile.gpu.compute_capability:
            notes.append(f"profile {profile.name} is written for compute capability {profile.gpu.compute_capability}"
                         f"{' (' + profile.gpu.name + ')' if profile.gpu.name else ''} but ran on {vers.get('gpu')} ({cc})")
            prov = "emulated"
    if prov == "emulated" and profile.provenance == "real":
        notes.append("results labelled emulated: they do not come from the device the profile describes")
    return prov, notes


def thread_notes(profile: HwProfile) -> list[str]:
    """Say so when a profile asks for more threads or cores than this machine has."""
    notes = []
    usable = len(usable_cores())
    if profile.threads.intra_op > usable:
        notes.append(f"profile {profile.name} asks for {profile.threads.intra_op} intra-op threads but only {usable} "
                     f"core(s) are usable here: threads share cores, so latency is pessimistic")
    return notes


def resolved_threads(profile: HwProfile) -> tuple[int, int]:
    """(intra-op, inter-op) thread counts the runners set: the profile's, with 0 ("all cores") read
    as the physical cores this process may use. Always a concrete number, so a measurement never
    inherits OMP_NUM_THREADS (Ray sets it to a task's CPU count) or a runtime's own default."""
    cores = max(1, min(physical_cores(), len(usable_cores())))
    return profile.threads.intra_op or cores, profile.threads.inter_op or cores


def effective_threads(profile: HwProfile) -> dict[str, Any]:
    """Threads asked for, and what the runners use (:func:`resolved_threads`)."""
    return {"intra_op": profile.threads.intra_op, "inter_op": profile.threads.inter_op,
            "intra_op_effective": resolved_threads(profile)[0]}
