"""``onnxprune eval MODEL --data SPEC``: accuracy with ONNX Runtime (onnxruntime + numpy only, no torch)."""
from __future__ import annotations

import click
from rich.console import Console

from ..datasets import evaluate_onnx, load_dataset
from ..model_io import load_model
from .common import emit_json, json_option, model_argument


@click.command("eval")
@model_argument
@click.option("--data", "data_spec", default="digits", show_default=True, metavar="SPEC",
              help="Dataset spec: digits, npz:PATH, imagefolder:PATH, cifar10:PATH, python:module:function "
                   "(options after '?', e.g. digits?resize=16x16).")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Which split to score (checkpoints are chosen on val; test is the final report).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val/test split.")
@json_option
def eval_cmd(model: str, data_spec: str, split: str, batch_size: int, seed: int, as_json: bool) -> None:
    """Top-1 (and top-5 above 5 classes) accuracy of MODEL, run by ONNX Runtime as it will be deployed."""
    load_model(model)  # one clear error for a missing or corrupt file before touching the data
    data = load_dataset(data_spec, seed=seed)
    res = evaluate_onnx(model, data, split=split, batch_size=batch_size)
    if as_json:
        emit_json(res)
        return
    top5 = f"  top-5 {res['top5']:.2%}" if res["top5"] is not None else ""
    Console().print(f"[bold]{model}[/bold] on {data.spec} ({res['split']}, {res['samples']} samples): "
                    f"top-1 {res['top1']:.2%}{top5}")
