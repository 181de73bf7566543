"""The PyTorch-source path: users who have the ``nn.Module`` prune it with torch-pruning's
DependencyGraph (``MetaPruner``), retrain it with the same loop as the ONNX path, and export it to
ONNX with :func:`onnxprune.bridge.torch_export.export_torch`; the exported file then goes through the same
``eval`` / ``profile`` / report as any other model. The ONNX-native path stays the default.

Python API::

    module = load_torch_factory("mypkg.models:resnet18", state_dict="weights.pt")
    module, summary = prune_torch_model(module, torch.zeros(1, 3, 32, 32), target_macs=0.5)
    history = train_module(module, "cifar10:/data", TrainConfig(epochs=30))
    export_torch(module, (torch.zeros(1, 3, 32, 32),), "pruned.onnx")

CLI: ``onnxprune finetune --torch module:factory [--state-dict PATH] --input-shape 1x3x32x32
[--prune-ratio R | --target-macs F] -o OUT.onnx --data SPEC [training flags]``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import OnnxPruneError, UnavailableError
from ..core.user_code import import_callable

CRITERIA = ("l1", "l2", "random", "fpgm", "lamp", "bn_scale")


def load_torch_factory(spec: str, state_dict: str | os.PathLike | None = None):
    """Build the module from ``module:factory`` (or ``path/to/file.py:factory``), then load weights.

    ``factory`` is called without arguments (a class or a function). ``state_dict`` is a file saved
    with ``torch.save(model.state_dict())`` (a checkpoint dict holding ``state_dict`` / ``model``
    also works; a ``module.`` prefix from DataParallel is stripped). Loaded with ``weights_only``.
    """
    import torch  # lazy: torch ([train] extra)

    modname, sep, fname = str(spec).rpartition(":")
    if not sep or not modname or not fname:
        raise OnnxPruneError(f"--torch {spec!r}: expected module:factory (e.g. mypkg.models:resnet18)")
    factory = import_callable(modname, fname, f"--torch {spec!r}", namespace="onnxprune_user_model")
    try:
        module = factory()
    except Exception as exc:  # noqa: BLE001 - user code
        raise OnnxPruneError(f"--torch {spec!r}: {fname}() raised {type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    if not isinstance(module, torch.nn.Module):
        raise OnnxPruneError(f"--torch {spec!r}: {fname}() returned {type(module).__name__}, not a torch.nn.Module")
    if state_dict is not None:
        p = Path(state_dict)
        if not p.exists():
            raise OnnxPruneError(f"--state-dict {p}: no such file")
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickles fail in many ways
            raise OnnxPruneError(f"--state-dict {p}: cannot load ({type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0][:200]})") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
        if not isinstance(sd, dict):
            raise OnnxPruneError(f"--state-dict {p}: expected a state dict, got {type(sd).__name__}")
        sd = {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}
        try:
            module.load_state_dict(sd)
        except RuntimeError as exc:
            raise OnnxPruneError(f"--state-dict {p} does not fit {fname}(): {(str(exc).splitlines() or [''])[0][:200]} "
                                 "...") from None
    return module.eval()


def _tp():
    try:
        import torch_pruning as tp  # lazy: torch-pruning ([train] extra)
    except ImportError:
        raise UnavailableError("the PyTorch-source path needs 'torch-pruning' (pip install 'onnxprune[train]')") from None
    return tp


def _importance(tp, criterion: str):
    if criterion not in CRITERIA:
        raise OnnxPruneError(f"unknown torch-pruning criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if criterion in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if criterion == "l1" else 2)
    return {"random": tp.importance.RandomImportance, "fpgm": tp.importance.FPGMImportance,
            "lamp": tp.importance.LAMPImportance, "bn_scale": tp.importance.BNScaleImportance}[criterion]()


def default_ignored_layers(module) -> list:
    """The classifier: the last ``nn.Linear`` (else the last conv) in registration order."""
    import torch.nn as nn  # lazy: torch ([train] extra)

    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return [linears[-1]]
    convs = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return convs[-1:]


def count_macs_params(module, example_inputs) -> tuple[int, int]:
    tp = _tp()
    was = module.training
    module.eval()
    macs, params = tp.utils.count_ops_and_params(module, example_inputs)
    module.train(was)
    return int(macs), int(params)


def _prune_once(module, example_inputs, ratio: float, criterion: str, global_pruning: bool,
                ignored_layers: Sequence | None, round_to: int | None, max_ratio: float, seed: int):
    import torch  # lazy: torch ([train] extra)

    tp = _tp()
    torch.manual_seed(seed)
    ignored = list(ignored_layers) if ignored_layers is not None else default_ignored_layers(module)
    module.eval()
    pruner = tp.pruner.MetaPruner(module, example_inputs, importance=_importance(tp, criterion),
                                  pruning_ratio=float(ratio), global_pruning=global_pruning,
                                  ignored_layers=ignored, round_to=round_to, max_pruning_ratio=max_ratio)
    pruner.step()
    return module


def prune_torch_model(module, example_inputs, ratio: float | None = None, criterion: str = "l1",
                      global_pruning: bool = False, ignored_layers: Sequence | None = None, *,
                      target_macs: float | None = None, round_to: int | None = None, max_ratio: float = 0.9,
                      seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Remove channels of ``module`` in place with torch-pruning; return it and a summary.

    Exactly one of ``ratio`` (fraction of channels removed per layer, or overall with
    ``global_pruning``) or ``target_macs`` (fraction of MACs kept, e.g. 0.5 for 2x fewer, reached by
    bisection on the ratio over copies of the module). ``ignored_layers`` default: the classifier
    (the last Linear), whose outputs are the classes.
    """
    import torch  # lazy: torch ([train] extra)

    if (ratio is None) == (target_macs is None):
        raise OnnxPruneError("give exactly one of ratio and target_macs")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    macs0, params0 = count_macs_params(module, example_inputs)
    if target_macs is not None:
        if not 0 < float(target_macs) <= 1:
            raise OnnxPruneError(f"target_macs must be in (0, 1] (fraction of MACs kept), got {target_macs!r}")
        ignored_names = None
        if ignored_layers is not None:  # the same layers in every copy, found by name
            ids = {id(m) for m in ignored_layers}
            ignored_names = [n for n, m in module.named_modules() if id(m) in ids]
        lo, hi = 0.0, max_ratio
        best = None
        for _ in range(14):
            mid = (lo + hi) / 2
            clone = copy.deepcopy(module)
            ign = None if ignored_names is None else [dict(clone.named_modules())[n] for n in ignored_names]
            trial = _prune_once(clone, example_inputs, mid, criterion, global_pruning, ign, round_to, max_ratio, seed)
            kept = count_macs_params(trial, example_inputs)[0] / macs0
            if kept <= target_macs:
                best, hi = mid, mid
            else:
                lo = mid
        ratio = best if best is not None else max_ratio
    elif not 0 <= float(ratio) < 1:
        raise OnnxPruneError(f"ratio must be in [0, 1), got {ratio!r}")
    _prune_once(module, example_inputs, float(ratio), criterion, global_pruning, ignored_layers, round_to,
                max_ratio, seed)
    macs1, params1 = count_macs_params(module, example_inputs)
    summary = {"method": "structured", "source": "pytorch", "library": "torch-pruning", "criterion": criterion,
               "global_pruning": bool(global_pruning), "ratio": float(ratio), "target_macs": target_macs,
               "macs_before": macs0, "macs_after": macs1, "macs_fraction": macs1 / macs0 if macs0 else None,
               "params_before": params0, "params_after": params1}
    return module, summary
