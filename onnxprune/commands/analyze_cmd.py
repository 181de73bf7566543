"""``onnxprune analyze MODEL``: the channel-coupling groups, and why any are unprunable."""
from __future__ import annotations

from typing import Any

import click

from ..channels.analyze import analyze_channels
from ..channels.types import Analysis
from ..core.prepare import prepare
from .common import emit_json, input_shape_option, json_option, model_argument
from rich.console import Console
from rich.table import Table


def analysis_to_dict(analysis: Analysis) -> dict[str, Any]:
    """The ``--json`` object: every group with its members; counts of (un)prunable groups."""
    groups = []
    for g in analysis.groups:
        groups.append({
            "id": g.id, "size": g.size, "prunable": g.prunable, "reason": g.reason, "blocks": g.blocks,
            "exact": g.exact, "inexact_reason": g.inexact_reason, "nodes": list(g.nodes),
            "members": [{"tensor": m.tensor, "axis": m.axis, "role": m.role, "node": m.node} for m in g.members],
        })
    return {"groups": groups, "prunable_groups": len(analysis.prunable), "unprunable_groups": len(analysis.unprunable)}


@click.command("analyze")
@model_argument
@input_shape_option
@click.option("--prune-hidden", is_flag=True,
              help="Analyse as prune --prune-hidden does: the hidden size (residual stream) of a transformer may prune.")
@click.option("--allow-io-change", is_flag=True,
              help="Analyse as prune --allow-io-change does: KV-cache inputs/outputs no longer fix their heads.")
@json_option
def analyze_cmd(model: str, input_shapes: dict, prune_hidden: bool, allow_io_change: bool, as_json: bool) -> None:
    """Channel-coupling groups of MODEL: size, members, nodes, and for unprunable ones the reason.
    The groups are those ``prune --structured`` with the same flags sees."""
    prep = prepare(model, input_shapes)
    analysis = analyze_channels(prep.view, prune_hidden=prune_hidden, allow_io_change=allow_io_change)
    if as_json:
        out = analysis_to_dict(analysis)
        if analysis.io:
            out["io"] = dict(analysis.io)  # model inputs/outputs that shrink with their channels: name -> axis
        out["notes"] = list(prep.notes)
        emit_json(out)
        return

    con = Console()
    table = Table(title=f"channel groups of {model}")
    for col in ("id", "channels", "members", "nodes", "prunable"):
        table.add_column(col, justify="right" if col in ("id", "channels", "members") else "left",
                         overflow="fold")
    for g in analysis.groups:
        weights = sum(1 for m in g.members if m.role != "act")
        size = f"{g.size}" + (f" ({g.blocks} blocks)" if g.blocks > 1 else "")
        nodes = ", ".join(g.nodes[:2]) + (f" (+{len(g.nodes) - 2} more)" if len(g.nodes) > 2 else "")
        status = ("yes" if g.exact else "yes (inexact)") if g.prunable else "[red]no[/red]"
        table.add_row(str(g.id), size, str(weights), nodes, status)
    con.print(table)
    for g in analysis.groups:
        if not g.prunable:
            con.print(f"group {g.id} unprunable: {g.reason}", soft_wrap=True, highlight=False)
        elif not g.exact:
            con.print(f"group {g.id} inexact: {g.inexact_reason}", soft_wrap=True, highlight=False)
    con.print(f"{len(analysis.prunable)} prunable group(s), {len(analysis.unprunable)} unprunable; "
              f"{sum(g.size for g in analysis.prunable)} of {sum(g.size for g in analysis.groups)} channels prunable")
    for note in prep.notes:
        con.print(f"[yellow]note:[/yellow] {note}")
