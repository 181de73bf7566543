"""What every step of a recipe run shares: its context (recipe, output folder, cache, data,
profiles), its progress bar, where models go, and the versions it records. In its own module so the
run, its executors and the report builder share it without importing one another."""
from __future__ import annotations

import platform
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..recipes import Recipe
from .cache import StepCache
import numpy
import onnx
import onnxruntime
from ..core.version import __version__
import sys
from ..profiling.environment import cpu_model, gpu_facts
from ..core.progress import ProgressBar

MODELS = "models"
WORK = "work"


@dataclass
class Context:
    recipe: Recipe
    outdir: Path
    cache: StepCache
    data: Any  # DatasetSplits or None
    data_desc: dict[str, Any] | None
    profiles: list[Any]  # HwProfile
    progress: "Progress"
    notes: list[str] = field(default_factory=list)
    recipe_source: str | None = None
    overrides: list[str] = field(default_factory=list)
    worker_versions: dict[str, Any] = field(default_factory=dict)  # what remote workers ran that this process did not

    def path(self, *parts: str) -> Path:
        return self.outdir.joinpath(*parts)

    def rel(self, p: Path) -> str:
        return str(Path(p).resolve().relative_to(self.outdir.resolve()))


class Progress:
    """The run's progress bar on stderr (or nothing), advanced once per finished run."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.frozen = False  # while the pipeline replays what an executor already reported
        self._bar: ProgressBar | None = None

    @contextmanager
    def running(self, total: int, label: str) -> Iterator["Progress"]:
        with ProgressBar(total, label, enabled=self.enabled) as bar:
            self._bar = bar
            try:
                yield self
            finally:
                self._bar = None

    def step(self, text: str) -> None:
        if self._bar is not None and not self.frozen:
            self._bar.info(text)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None and not self.frozen:
            self._bar.advance(n)


def finetune_dense_enabled(recipe: Recipe) -> bool:
    return recipe.retrain.finetune_dense and recipe.retrain.epochs > 0


def dense_finetuned_name(seed: int) -> str:
    return f"dense-finetuned-s{seed}.onnx"


def versions() -> dict[str, Any]:


    out = {"onnxprune": __version__, "python": platform.python_version(), "platform": platform.platform(),
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}

    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def node_info() -> dict[str, Any]:
    """The machine a measurement ran on: host name, CPU model and GPU (None without one)."""

    return {"host": socket.gethostname(), "cpu": cpu_model(), "gpu": (gpu_facts() or {}).get("gpu")}
