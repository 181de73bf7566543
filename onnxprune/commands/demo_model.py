"""The demo's model: a small CNN for scikit-learn's 8x8 digits, trained in seconds on a CPU (needs torch).

Three 3x3 conv blocks with batch norm (prunable channel groups, one of them across a max-pool),
global average pooling and a linear classifier: big enough for structured pruning to remove real
MACs, small enough to train and retrain many times within the demo's time budget.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import OnnxPruneError, UnavailableError
import numpy as np
from ..datasets import load_dataset
from ..training import TrainConfig, train_module
import importlib.util
from ..pipeline.cache import StepCache, locked
from ..pipeline.run import run_recipe


def build_digits_cnn(width: int = 32, classes: int = 10, in_channels: int = 1):
    """The untrained module (torch imported here, not at module import)."""
    import torch.nn as nn  # lazy: torch ([train] extra)

    c = width
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * c, classes),
    )


def train_demo_model(path: str | os.PathLike, data: Any = "digits", *, epochs: int = 8, seed: int = 0,
                     width: int = 32, progress: bool = False) -> dict[str, Any]:
    """Train the CNN on ``data`` (a spec or DatasetSplits), export it to ``path``; returns the history."""
    import torch  # lazy: torch ([train] extra)

    from ..bridge.torch_export import export_torch  # lazy: imports torch

    ds = load_dataset(data, seed=0)
    torch.manual_seed(seed)
    module = build_digits_cnn(width=width, classes=ds.num_classes, in_channels=ds.input_shape[0])
    config = TrainConfig(epochs=epochs, lr=0.05, schedule="cosine", optimizer="sgd", weight_decay=5e-4,
                         batch_size=64, seed=seed, train_bn=True)
    hist = train_module(module, ds, config, progress=progress, description="train demo CNN")
    example = torch.from_numpy(np.zeros((1, *ds.input_shape), dtype=np.float32))
    export_torch(module.eval(), [example], Path(path))
    return {"path": str(path), "epochs": epochs, "best_val_top1": hist.get("best_val_top1"), "seconds": hist.get("seconds")}


DEMO_FULL = (10, 32, [])
DEMO_QUICK = (4, 16, ["retrain.epochs=1", "profiling.min_runs=5", "profiling.min_duration_s=0.05", "profiling.memory=false",
                      "sweep.methods.0.options.round_to=4"])
DEMO_DATA = "digits"


def run_demo(outdir: "str | os.PathLike" = "demo_out", *, quick: bool = False, progress: bool = False,
             overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Train a small CNN on digits, export it, run ``recipes/demo.yaml`` on it, write the report.

    The trained model is ``outdir/digits_cnn.onnx``; a re-run reuses it and every finished step.
    """

    if importlib.util.find_spec("torch") is None:
        raise UnavailableError("onnxprune demo trains a CNN and needs torch: pip install 'onnxprune[train]'")

    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OnnxPruneError(f"{outdir}: exists and is not a directory; choose another -o")
    outdir.mkdir(parents=True, exist_ok=True)
    epochs, width, quick_overrides = DEMO_QUICK if quick else DEMO_FULL
    model_path = outdir / "digits_cnn.onnx"
    with locked(outdir):  # the training step's record too: one run per OUTDIR
        cache = StepCache.open(outdir)
        cache.run("demo-train", {"epochs": epochs, "width": width, "seed": 0, "data": DEMO_DATA},
                  lambda: train_demo_model(model_path, DEMO_DATA, epochs=epochs, width=width, progress=progress),
                  outputs=[model_path])
        return run_recipe("demo", model_path, outdir, data=DEMO_DATA, overrides=[*quick_overrides, *overrides],
                          progress=progress)
