"""The Python API: the CLI's steps as plain functions returning plain data (the ``--json`` shapes).

For deployment pipelines that call onnxprune without the command line::

    from onnxprune import api

    info = api.inspect("model.onnx")                                    # params, MACs, sizes, layers
    res = api.prune("model.onnx", "small.onnx", method="structured", target_macs=0.5)
    hist = api.finetune("small.onnx", "digits", "small-ft.onnx", epochs=3, lr=0.005)
    acc = api.evaluate("small-ft.onnx", "digits")                       # {"top1", "top5", ...}
    lat = api.profile("small-ft.onnx", ["ci-cpu"])                      # latency, memory per profile
    report = api.run("structured-l1-2x-macs", "model.onnx", "out", data="digits")

``torch`` is imported only inside ``finetune``, ``run`` with retraining and ``demo``, so the rest
works on a machine without it. Errors are :class:`onnxprune.OnnxPruneError`
with a one-line message. See ``examples/api_example.py`` for a runnable example.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from .core.errors import OnnxPruneError
from .sparsity import prune_nm, prune_unstructured
from .structured import prune_structured
from .metrics.inspection import inspect_model
from .channels.analyze import analyze_channels
from .commands.analyze_cmd import analysis_to_dict
from .core.prepare import prepare
from .core.model_io import refuse_overwrite_input, save_model
from .training import TrainConfig, finetune as _finetune
from .datasets import evaluate_onnx
from .datasets.fidelity import evaluate_outputs
from .profiling import profile_model, compare_models
from .pipeline.run import run_recipe
from .report.render import render_run_dir
from .report.compare import compare_runs as _compare
from .commands.demo_model import run_demo

PathLike = "str | os.PathLike"


def inspect(model: "str | os.PathLike", input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Params, nonzero params, MACs, file size, I/O, op histogram and per-node figures (``inspect --json``)."""

    return inspect_model(model, {k: tuple(v) for k, v in (input_shapes or {}).items()} or None)


def analyze(model: "str | os.PathLike", input_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """Channel-coupling groups and why any are unprunable (``analyze --json``)."""

    prep = prepare(model, {k: tuple(v) for k, v in (input_shapes or {}).items()} or None)
    out = analysis_to_dict(analyze_channels(prep.view))
    out["notes"] = list(prep.notes)
    return out


def prune(model: "str | os.PathLike", output: "str | os.PathLike | None" = None, *, method: str = "structured",
          **kwargs: Any) -> dict[str, Any]:
    """Prune ``model`` with ``method`` ("structured", "unstructured" or "nm") and return the summary.

    ``kwargs`` go to :func:`~onnxprune.structured.prune.prune_structured` (``ratio`` / ``target_macs`` /
    ``target_params``, ``criterion``, ``scope`` ...), :func:`~onnxprune.sparsity.prune.prune_unstructured`
    (``sparsity``, ``scope``, ``min_threshold``, ``criterion`` ...) or :func:`~onnxprune.sparsity.prune.prune_nm`
    (``n``, ``m``). With ``output`` the pruned model is written there (``summary["output"]``).
    """
    fn = {"structured": prune_structured, "unstructured": prune_unstructured, "nm": prune_nm}.get(method)
    if fn is None:
        raise OnnxPruneError(f"method must be structured, unstructured or nm, not {method!r}")
    res = fn(model, **kwargs)
    summary = dict(res.summary)
    if output is not None:
        refuse_overwrite_input(model, output)
        save_model(res.model, output)
        summary["output"] = str(output)
    return summary


def finetune(model: "str | os.PathLike", data: Any = "digits", output: "str | os.PathLike | None" = None, *,
             teacher: "str | os.PathLike | None" = None, progress: bool = False, **config: Any) -> dict[str, Any]:
    """Retrain ``model`` on ``data`` (masks kept) with :class:`~onnxprune.training.TrainConfig` fields
    as keywords (``epochs``, ``lr``, ``optimizer``, ...); write it to ``output``; return the history."""

    trained, hist = _finetune(model, data, TrainConfig.from_dict(config), teacher=teacher, progress=progress)
    if output is not None:
        refuse_overwrite_input(model, output)
        save_model(trained, output)
        hist = {**hist, "output": str(output)}
    return hist


def evaluate(model: "str | os.PathLike", data: Any = "digits", split: str = "test", batch_size: int = 256, *,
             reference: "str | os.PathLike | None" = None, metric: str | None = None) -> dict[str, Any]:
    """Top-1 / top-5 accuracy with ONNX Runtime on ``split`` (``eval --json``); with ``reference``
    (the dense model) also fidelity per graph output, with ``metric`` (``python:module:function``)
    the user's figures; both work on unlabeled data."""
    if reference is not None or metric is not None:
        return evaluate_outputs(model, data, split, batch_size, reference=reference, metric=metric)

    return evaluate_onnx(model, data, split, batch_size)


def profile(model: "str | os.PathLike", profiles: "str | Iterable[str] | None" = None, **kwargs: Any) -> dict[str, Any]:
    """Latency percentiles, throughput, peak memory, size and MACs per hardware profile (``profile --json``)."""

    return profile_model(model, profiles, **kwargs)


def compare(a: "str | os.PathLike", b: "str | os.PathLike", profile: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Interleaved latency comparison of two models on one profile (``compare --json``)."""

    return compare_models(a, b, profile, **kwargs)


def run(recipe: Any, model: "str | os.PathLike", outdir: "str | os.PathLike", *, data: Any = None,
        hw: Sequence[str] = (), overrides: Iterable[str] = (), progress: bool = False, executor: str | None = None,
        ray_address: str | None = None) -> dict[str, Any]:
    """Run a recipe (shipped name, YAML path or :class:`~onnxprune.recipes.Recipe`) end to end; the
    report (also written to ``outdir/report.json``, ``.md``, ``.html``). ``executor``: local or ray."""

    return run_recipe(recipe, model, outdir, data=data, hw=hw, overrides=overrides, progress=progress,
                      executor=executor, ray_address=ray_address)


def report(outdir: "str | os.PathLike") -> dict[str, Any]:
    """Re-render a run directory's report.md, report.html and plots from its report.json."""

    return render_run_dir(outdir)


def compare_runs(dir_a: "str | os.PathLike", dir_b: "str | os.PathLike") -> dict[str, Any]:
    """Two run directories side by side (``compare-runs --json``)."""

    return _compare(dir_a, dir_b)


#: The demo's settings: (dense training epochs, CNN width, recipe overrides). --quick trades accuracy for time;
#: its half-width CNN keeps channels in multiples of 4 (multiples of 8 leave too few choices to reach 2x MACs).
def demo(outdir: "str | os.PathLike" = "demo_out", *, quick: bool = False, progress: bool = False,
         overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Train a small CNN on digits, export it, run ``recipes/demo.yaml`` on it, write the report.

    The trained model is ``outdir/digits_cnn.onnx``; a re-run reuses it and every finished step.
    """

    return run_demo(outdir, quick=quick, progress=progress, overrides=overrides)


__all__ = ["inspect", "analyze", "prune", "finetune", "evaluate", "profile", "compare", "run", "report",
           "compare_runs", "demo"]
