"""``onnxprune eval MODEL --data SPEC``: accuracy with ONNX Runtime (onnxruntime + numpy only, no torch).

``--reference DENSE`` adds fidelity per graph output (no labels needed); ``--metric
python:module:function`` adds the user's own figures (mAP, CER, ...) computed from the outputs.
"""
from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from ..datasets import evaluate_onnx, load_dataset
from ..core.errors import OnnxPruneError
from ..core.model_io import load_model
from .common import emit_json, json_option, model_argument
from ..datasets.output_kind import parse_output_kinds
from ..datasets.fidelity import evaluate_outputs
from ..datasets.spec import selected_split
from ..datasets.types import SPLITS


@click.command("eval")
@model_argument
@click.option("--data", "data_spec", default="digits", show_default=True, metavar="SPEC",
              help="Dataset spec: digits, npz:PATH, imagefolder:PATH, images:DIR, cifar10:PATH, python:module:function "
                   "(options after '?', e.g. digits?resize=16x16). Unlabeled data needs --reference or --metric.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default=None,
              help="Which split to score (checkpoints are chosen on val; test is the final report). Default: the "
                   "data spec's ?split=, else test.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val/test split.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="DENSE",
              help="Reference ONNX model (the dense original): report rel_l2, cosine, max_abs_diff (and "
                   "top1_agreement for class scores) per graph output. Needs no labels.")
@click.option("--metric", "metric_spec", default=None, metavar="python:MODULE:FUNCTION",
              help="Your metric: FUNCTION(outputs: dict name -> array, labels or None) -> dict of named numbers.")
@click.option("--output-kind", "output_kind", multiple=True, metavar="NAME=KIND",
              help="What an output is (scores, probs, embedding, value; repeatable): scores/probs get top1_agreement, "
                   "an embedding mean_cosine and nn_agreement. Inferred from the graph otherwise.")
@json_option
def eval_cmd(model: str, data_spec: str, split: str | None, batch_size: int, seed: int, reference: str | None,
             metric_spec: str | None, output_kind: tuple[str, ...], as_json: bool) -> None:
    """Top-1 (and top-5 above 5 classes) accuracy of MODEL, run by ONNX Runtime as it will be deployed;
    fidelity against --reference and your own --metric, with or without labels."""

    split = scored_split(data_spec, split)
    kinds = parse_output_kinds(output_kind)
    if kinds and reference is None:
        raise OnnxPruneError("--output-kind decides the fidelity figures: it goes with --reference DENSE")
    load_model(model)  # one clear error for a missing or corrupt file before touching the data
    if reference:
        load_model(reference)
    data = load_dataset(data_spec, seed=seed)
    if reference is None and metric_spec is None:
        if not data.labeled:
            raise OnnxPruneError(f"data {data.spec!r} has no labels: give --reference DENSE (fidelity against the "
                                 "dense model) or --metric python:module:function")
        res = evaluate_onnx(model, data, split=split, batch_size=batch_size)
    else:
        res = evaluate_outputs(model, data, split, batch_size, reference=reference, metric=metric_spec,
                               output_kinds=kinds)
    if as_json:
        emit_json(res)
        return
    _print(model, data.spec, res)


def scored_split(data_spec: str, flag: str | None) -> str:
    """The split eval scores: the data spec's ``?split=`` (as ``--calibrate`` reads it), else
    ``--split``, else test; both given and different is an error rather than a silent choice."""
    spec_split = selected_split(data_spec, flag or "test")[1]
    if flag is not None and spec_split != flag:
        raise OnnxPruneError(f"--split {flag} disagrees with the data spec's split={spec_split} ({data_spec!r}): "
                             "give one of them")
    if spec_split not in SPLITS:
        raise OnnxPruneError(f"eval scores one split ({', '.join(SPLITS)}), not split={spec_split} ({data_spec!r})")
    return spec_split


def _print(model: str, spec: str, res: dict[str, Any]) -> None:
    con = Console()
    head = f"[bold]{model}[/bold] on {spec} ({res['split']}, {res['samples']} samples)"
    if res.get("top1") is not None:
        top5 = f"  top-5 {res['top5']:.2%}" if res.get("top5") is not None else ""
        head += f": top-1 {res['top1']:.2%}{top5}"
    con.print(head)
    for name, f in (res.get("fidelity") or {}).items():
        agree = f"  top-1 agreement {f['top1_agreement']:.2%}" if "top1_agreement" in f else ""
        if "mean_cosine" in f:
            agree += f"  mean cosine {f['mean_cosine']:.6f}"
        if "nn_agreement" in f:
            agree += f"  nearest-neighbour agreement {f['nn_agreement']:.2%}"
        kind = f" ({res['output_kinds'][name]})" if name in (res.get("output_kinds") or {}) else ""
        con.print(f"  {name}{kind}: rel_l2 {f['rel_l2']:.4g}  cosine {f['cosine']:.6f}  max_abs_diff {f['max_abs_diff']:.4g}"
                  f"{agree}  (vs {res['reference']})")
    for k, v in (res.get("metric") or {}).items():
        con.print(f"  {k}: {v:.6g}")
    for k, why in (res.get("missing") or {}).items():
        con.print(f"  {k}: not measured: {why}", markup=False, highlight=False)
