"""``onnxprune inspect MODEL``."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ..metrics.inspection import inspect_model
from .common import emit_json, human, input_shape_option, json_option, model_argument


@click.command("inspect")
@model_argument
@input_shape_option
@json_option
@click.option("--all-nodes", is_flag=True, help="List every node, not only those with weights or MACs.")
def inspect_cmd(model: str, input_shapes: dict, as_json: bool, all_nodes: bool) -> None:
    """Params, MACs, I/O, op histogram and per-layer figures of MODEL."""
    info = inspect_model(model, input_shapes)
    if as_json:
        emit_json(info)
        return
    con = Console()
    con.print(f"[bold]{info['model']}[/bold]  opset {info['opset']}  ir {info['ir_version']}  {info['producer']}")
    con.print(f"params {human(info['params'])} (nonzero {human(info['nonzero_params'])}, sparsity {info['sparsity']:.1%})  "
              f"MACs {macs_text(info)}  file {human(info['file_bytes'], 'B')}", soft_wrap=True)
    q = info.get("quantization")
    if q:
        con.print(f"{q['label']}: " + ", ".join(f"{k} x{v}" for k, v in q["ops"].items()), soft_wrap=True)
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            con.print(f"  {kind[:-1]:6} {v['name']}: {v['dtype']} {v['shape']}")
    table = Table(title="layers", show_lines=False)
    for col in ("name", "op", "output shape", "params", "MACs", "sparsity"):
        table.add_column(col, justify="right" if col in ("params", "MACs", "sparsity") else "left")
    for n in info["nodes"]:
        if not all_nodes and not n["params"] and not n["macs"]:
            continue
        sp = f"{n['sparsity']:.1%}" if "sparsity" in n else ""
        if n.get("nm"):
            sp += " (2:4)" if n["nm"].get("2:4") else ""
        table.add_row(n["name"], n["op_type"], str(n["output_shape"]), human(n["params"]), human(n["macs"]), sp)
    con.print(table)
    con.print("ops: " + ", ".join(f"{k}={v}" for k, v in info["op_histogram"].items()))
    con.print(f"[dim]MACs: {info['macs_convention']}[/dim]")
    for note in info["notes"]:
        con.print(f"[yellow]note:[/yellow] {note}")


def macs_text(info: dict) -> str:
    """``1.23 M``, or ``n/a (why: how to get them)``."""
    if info["macs"] is not None or not info.get("macs_unknown_reason"):
        return human(info["macs"])
    return f"n/a ({info['macs_unknown_reason']})"
