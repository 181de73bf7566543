"""Hardware profiles: what to measure on, and how (``hw_profiles/*.yaml``).

A profile names a backend (``ort-cpu``, ``ort-cuda``, ``tensorrt``, ``torch-cpu``, ``torch-cuda``),
its threads, precision, batch sizes and measurement rules (warm-up, at least ``min_runs`` runs AND
at least ``min_duration_s`` seconds), budgets, and its provenance: ``real`` when the numbers come
from the device itself, ``emulated`` when another machine runs with the device's limits (thread
count, memory limit) -- which does not make its cores as slow as the device's.

Unknown keys are errors (a typo must not silently fall back to a default), and every error names
the file and the field in one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.errors import OnnxPruneError
from .ssh_target import check_remote_python, check_ssh_option, parse_target
from ..resources import shipped

Backend = Literal["ort-cpu", "ort-cuda", "tensorrt", "torch-cpu", "torch-cuda"]
Precision = Literal["fp32", "fp16", "int8"]

#: Precisions each backend can measure, and why the others are refused.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "ort-cpu": ("fp32",),
    "ort-cuda": ("fp32",),
    "tensorrt": ("fp32", "fp16"),
    "torch-cpu": ("fp32",),
    "torch-cuda": ("fp32", "fp16"),
}
_WHY_NOT = {
    ("ort-cpu", "int8"): "int8 on ONNX Runtime needs a quantized model (onnxruntime.quantization), which onnxprune does not produce",
    ("ort-cpu", "fp16"): "the ONNX Runtime CPU provider has few fp16 kernels; profile fp32 on CPU",
    ("ort-cuda", "fp16"): "fp16 would need converting the model to float16, which onnxprune does not do; use the tensorrt backend for fp16",
    ("ort-cuda", "int8"): "int8 needs a quantized model, which onnxprune does not produce",
    ("tensorrt", "int8"): "TensorRT int8 needs a calibration data set, which onnxprune does not implement; use fp16",
    ("torch-cpu", "fp16"): "PyTorch's CPU fp16 kernels are not representative of deployment; use fp32",
    ("torch-cpu", "int8"): "int8 needs quantization, which onnxprune does not do",
    ("torch-cuda", "int8"): "int8 needs quantization, which onnxprune does not do",
}
#: A batch dimension placeholder in ``input_shapes`` (``[N, 3, 224, 224]``).
BATCH_PLACEHOLDERS = ("N", "n", "batch")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Threads(_Strict):
    """ONNX Runtime / torch thread pools. ``intra_op: 0`` means the runtime default (all cores)."""

    intra_op: int = Field(0, ge=0)
    inter_op: int = Field(1, ge=0)


class GpuSpec(_Strict):
    """The GPU a profile was written for: results on another GPU are labelled ``emulated``."""

    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    name: str | None = None


class HwProfile(_Strict):
    """One validated hardware profile (see the module docstring)."""

    name: str = Field(min_length=1)
    description: str = ""
    backend: Backend
    threads: Threads = Threads()
    cpu_affinity: list[int] | None = None
    precision: Precision = "fp32"
    sparse_weights: bool = False
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    input_shapes: dict[str, list[Union[int, str]]] = Field(default_factory=dict)
    warmup_runs: int = Field(10, ge=0)
    min_runs: int = Field(50, ge=1)
    min_duration_s: float = Field(2.0, ge=0)
    memory_limit_mb: float | None = Field(None, gt=0)
    latency_budget_ms: float | None = Field(None, gt=0)
    provenance: Literal["real", "emulated"] = "real"
    emulates: str | None = None
    #: CPU architecture the profile was written for (``platform.machine()``: x86_64, aarch64); results
    #: measured on another architecture are labelled ``emulated``
    arch: str | None = None
    gpu: GpuSpec | None = None
    #: kept channel counts are multiples of this when structured pruning targets the profile (the
    #: default ``--round-to``): the runtime's fast kernels work on channel blocks (ONNX Runtime CPU's
    #: NCHWc convs on 8; fp16 tensor cores want 8-16, TensorRT picks best on 16-32); None = any count
    channel_multiple: int | None = Field(None, ge=1)
    notes: list[str] = Field(default_factory=list)
    #: measure on this device over SSH (``USER@HOST[:PORT]`` or a ``~/.ssh/config`` alias; see profiling.remote)
    remote: str | None = None
    #: the Python on the device that has onnxprune installed: a bare command name or a path (e.g. a
    #: venv's ``/home/pi/venv/bin/python``); never a shell fragment (see profiling.ssh_target)
    remote_python: str = Field("python3", min_length=1)
    #: ``KEY=VALUE`` options passed to ssh and scp as ``-o KEY=VALUE`` (e.g. ``IdentityFile=~/.ssh/board``),
    #: from an allowlist; options that run programs belong in ~/.ssh/config (see profiling.ssh_target)
    ssh_options: list[str] = Field(default_factory=list)
    #: seconds one remote profile or compare may take before it is killed on the device
    remote_timeout_s: float = Field(900.0, gt=0)
    #: where the profile was read from (set by the loader, not a YAML key)
    source: str | None = Field(None, exclude=True)

    @field_validator("batch_sizes")
    @classmethod
    def _positive_batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive")
        if len(set(v)) != len(v):
            raise ValueError("batch sizes must not repeat")
        return v

    @field_validator("remote")
    @classmethod
    def _remote(cls, v: str | None) -> str | None:
        if v is not None:
            parse_target(v)  # raises ValueError with the expected form
        return v

    @field_validator("remote_python")
    @classmethod
    def _remote_python(cls, v: str) -> str:
        return check_remote_python(v)

    @field_validator("ssh_options")
    @classmethod
    def _ssh_options(cls, v: list[str]) -> list[str]:
        return [check_ssh_option(opt) for opt in v]

    @field_validator("cpu_affinity")
    @classmethod
    def _cores(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list pins to no core; leave cpu_affinity out for all cores")
        if any(c < 0 for c in v) or len(set(v)) != len(v):
            raise ValueError("core ids must be distinct non-negative integers")
        return v

    @field_validator("input_shapes")
    @classmethod
    def _shapes(cls, v: dict[str, list[int | str]]) -> dict[str, list[int | str]]:
        for name, dims in v.items():
            if not dims:
                raise ValueError(f"input {name!r}: no dimensions")
            first, rest = dims[0], dims[1:]
            if not (first in BATCH_PLACEHOLDERS or (isinstance(first, int) and first >= 1)):
                raise ValueError(f"input {name!r}: dimension 0 is the batch; write N (filled from batch_sizes) or a positive int")
            if any(not isinstance(d, int) or d < 1 for d in rest):
                raise ValueError(f"input {name!r}: dimensions after the batch must be positive integers, got {dims}")
        return v

    @model_validator(mode="after")
    def _backend_rules(self) -> "HwProfile":
        if self.precision not in PRECISIONS[self.backend]:
            why = _WHY_NOT.get((self.backend, self.precision), "")
            raise ValueError(f"precision: {self.precision} is not supported on backend {self.backend}"
                             f" (supported: {', '.join(PRECISIONS[self.backend])}){': ' + why if why else ''}")
        if self.sparse_weights and self.backend != "tensorrt":
            raise ValueError("sparse_weights: 2:4 sparse kernels are a TensorRT feature; only backend tensorrt takes it")
        if self.provenance == "emulated" and not self.emulates:
            raise ValueError("emulates: an emulated profile must say what it emulates")
        if self.gpu is not None and self.backend not in ("ort-cuda", "tensorrt", "torch-cuda"):
            raise ValueError(f"gpu: backend {self.backend} does not run on a GPU")
        return self

    # ---- derived -------------------------------------------------------------------------------
    @property
    def is_gpu(self) -> bool:
        return self.backend in ("ort-cuda", "tensorrt", "torch-cuda")

    def shapes_for_batch(self, batch: int) -> dict[str, tuple[int, ...]]:
        """``input_shapes`` with the batch dimension set to ``batch``."""
        return {name: (batch, *(int(d) for d in dims[1:])) for name, dims in self.input_shapes.items()}

    def label(self) -> str:
        return f"{self.name} ({self.source})" if self.source else self.name


def with_remote(profile: HwProfile, remote: str | None = None, options: Sequence[str] = ()) -> HwProfile:
    """``profile`` measured on ``remote`` (when given) with ``options`` added (``--remote``, ``--ssh-option``),
    validated as a profile's own ``remote``/``ssh_options`` are."""
    if not remote and not options:
        return profile
    data = profile.model_dump()
    if remote:
        data["remote"] = remote
    data["ssh_options"] = [*data.get("ssh_options", []), *options]
    try:
        new = HwProfile.model_validate(data)
    except ValidationError as exc:
        raise OnnxPruneError(f"--remote/--ssh-option: {_first_error(exc)}") from None
    return new.model_copy(update={"source": profile.source})


def profile_channel_multiple(name_or_path: "str | os.PathLike | HwProfile | None") -> tuple[int, str | None]:
    """(kept-channel multiple, profile name) of a profile; ``(1, None)`` for ``None``, a plain backend
    name, or a profile without ``channel_multiple``."""
    if name_or_path is None or str(name_or_path) in PRECISIONS:
        return 1, None
    prof = load_hw_profile(name_or_path)
    return (prof.channel_multiple, prof.name) if prof.channel_multiple else (1, None)


def shipped_profiles() -> dict[str, Path]:
    """Profiles that ship with onnxprune, by name."""

    return shipped("hw_profiles")


def load_hw_profile(name_or_path: "str | os.PathLike | HwProfile") -> HwProfile:
    """A shipped profile by name (``x86-server-cpu``) or a YAML file by path, validated."""
    if isinstance(name_or_path, HwProfile):
        return name_or_path
    text = str(name_or_path)
    shipped = shipped_profiles()
    if text in shipped:
        path = shipped[text]
    else:
        path = Path(text)
        if not path.exists():
            known = ", ".join(shipped) or "none"
            raise OnnxPruneError(f"hardware profile {text!r}: no such file and not a shipped profile (shipped: {known})")
        if path.is_dir():
            raise OnnxPruneError(f"{path}: is a directory, expected a hardware profile .yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise OnnxPruneError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxPruneError(f"{path}: cannot read ({exc})") from exc
    return profile_from_dict(data, path)


def profile_from_dict(data: object, path: "str | os.PathLike | None" = None) -> HwProfile:
    """Validate a parsed profile mapping; errors name ``path`` and the first bad field."""
    label = str(path) if path is not None else "hardware profile"
    if not isinstance(data, dict):
        raise OnnxPruneError(f"{label}: expected a mapping of profile fields, got {type(data).__name__}")
    if "source" in data:
        raise OnnxPruneError(f"{label}: field 'source': is set by onnxprune, not in the file")
    try:
        profile = HwProfile.model_validate(data)
    except ValidationError as exc:
        raise OnnxPruneError(f"{label}: {_first_error(exc)}") from exc
    return profile.model_copy(update={"source": str(path)}) if path is not None else profile


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = f"unknown field (allowed: {', '.join(k for k in HwProfile.model_fields if k != 'source')})" if len(err["loc"]) == 1 \
            else "unknown field"
    elif err["type"] == "literal_error" and "input" in err:
        msg = f"{err['input']!r} is not one of {msg.split('Input should be ', 1)[-1]}"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if not loc:  # a model-level rule: its message starts with the field name
        return f"field {msg.split(':', 1)[0]!r}:{msg.split(':', 1)[1]}{more}" if ":" in msg else msg + more
    return f"field {loc!r}: {msg}{more}"
