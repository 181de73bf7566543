"""``onnxprune profile MODEL --hw PROFILE ...`` and ``onnxprune compare A B --hw PROFILE``."""
from __future__ import annotations

from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from ..profiling.api import DEFAULT_PROFILE, compare_models, profile_model
from ..profiling.hw_profile import load_hw_profile, with_remote
from ..profiling.provenance import measured_on_line, merge_measured_on
from .common import emit_json, human, input_shape_option, json_option, model_argument, remote_options

_hw_help = ("Hardware profile: a shipped name (x86-server-cpu, edge-arm-4t, microserver-1t, nvidia-server-cuda, "
            "nvidia-tensorrt-fp16, jetson-orin-tensorrt, ci-cpu) or a YAML file.")
_batch_option = click.option("--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True,
                             help="Batch size (repeatable); replaces the profiles' batch_sizes.")




def remote_profiles(hw: list[str], remote: str | None, ssh_options: tuple[str, ...]) -> list:
    """The profiles by name, measured on ``remote`` when given (names as they are otherwise)."""
    if not remote and not ssh_options:
        return hw
    return [with_remote(load_hw_profile(h), remote, ssh_options) for h in hw]


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _notes(con: Console, notes: list[str]) -> None:
    for note in dict.fromkeys(notes):
        con.print(f"[yellow]note:[/yellow] {note}")


@click.command("profile")
@model_argument
@click.option("--hw", "hw", multiple=True, metavar="PROFILE", help=_hw_help + f" Repeatable; default {DEFAULT_PROFILE}.")
@_batch_option
@input_shape_option
@click.option("--per-node", is_flag=True, help="Add ONNX Runtime's per-node breakdown (top nodes and ops by time).")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory probes (fresh processes; a few seconds each).")
@remote_options
@json_option
def profile_cmd(model: str, hw: tuple[str, ...], batch_sizes: tuple[int, ...], input_shapes: dict, per_node: bool,
                no_memory: bool, remote: str | None, ssh_options: tuple[str, ...], as_json: bool) -> None:
    """Measure latency, throughput, memory, size and MACs of MODEL on hardware profiles."""
    result = profile_model(model, remote_profiles(list(hw) or [DEFAULT_PROFILE], remote, ssh_options), per_node=per_node, input_shapes=input_shapes or None,
                           batch_sizes=list(batch_sizes) or None, memory=not no_memory)
    if as_json:
        emit_json(result)
        return
    con = Console()
    con.print(f"[bold]{result['model']}[/bold]  params {human(result['params'])}  MACs {human(result['macs'])}  "
              f"file {human(result['file_bytes'], 'B')}  sparsity {result['sparsity']:.1%}")
    seen: set[str] = set()
    for r in result["results"]:
        if r["profile"] not in seen:
            seen.add(r["profile"])
            threads = r["threads"]
            con.print(f"[bold]{r['profile']}[/bold]: {r['backend']} {r['precision']} on {r['provider']}, "
                      f"{threads['intra_op_effective']} intra-op thread(s), provenance {r['provenance']}"
                      + (f" (emulates {r['emulates']})" if r["provenance"] == "emulated" and r["emulates"] else ""))
            if "remote" in r:
                con.print(_device_line(r["remote"]))
            con.print("  " + measured_on_line(merge_measured_on([x.get("measured_on") for x in result["results"]
                                                                 if x["profile"] == r["profile"]])), markup=False)
    table = Table(title="latency (ms) per profile and batch size", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("profile", "batch", "p50", "p90", "p99", "mean", "runs", "items/s", "peak RSS"):
        table.add_column(col, justify="left" if col == "profile" else "right")
    for r in result["results"]:
        lat = r["latency_ms"]
        rss = human(r["peak_rss_bytes"], "B") if "peak_rss_bytes" in r else "-"
        if "gpu_memory_bytes" in r:
            rss += f" +{human(r['gpu_memory_bytes'], 'B')} GPU"
        table.add_row(r["profile"], str(r["batch_size"]), _ms(lat["p50"]), _ms(lat["p90"]), _ms(lat["p99"]),
                      _ms(lat["mean"]), str(r["runs"]), f"{r['throughput_per_s']:.0f}", rss)
    con.print(table)
    for r in result["results"]:
        checks = []
        if r["meets_latency_budget"] is not None:
            checks.append(f"p90 {'within' if r['meets_latency_budget'] else 'OVER'} the {r['latency_budget_ms']:g} ms budget")
        if r["meets_memory_limit"] is not None:
            checks.append(f"memory {'within' if r['meets_memory_limit'] else 'OVER'} the {r['memory_limit_mb']:g} MB limit")
        if checks:
            con.print(f"{r['profile']} batch {r['batch_size']}: " + "; ".join(checks))
        if "per_node" in r:
            _per_node_table(con, r)
    for s in result["skipped"]:
        con.print(f"[yellow]skipped:[/yellow] {s['profile']} batch {s['batch_size']}: {s['reason']}")
    _notes(con, [n for r in result["results"] for n in r["notes"]])


def _device_line(dev: dict[str, Any]) -> str:
    mem = f", {human(dev['memory_bytes'], 'B')} RAM" if dev.get("memory_bytes") else ""
    return (f"  on {dev['target']} ({dev['host']}): {dev['cpu_model']}, {dev['cpu_cores']} cores{mem}, {dev['platform']}, "
            f"onnxruntime {dev['onnxruntime']} ({', '.join(dev['providers'])})")


def _per_node_table(con: Console, r: dict[str, Any]) -> None:
    pn = r["per_node"]
    table = Table(title=f"{r['profile']} batch {r['batch_size']}: top nodes ({pn['kernel_ms_per_run']:.3f} ms of kernels per run)",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("node", "op", "model node", "ms/run", "share"):
        table.add_column(col, justify="right" if col in ("ms/run", "share") else "left")
    for n in pn["top_nodes"]:
        table.add_row(n["node"], n["op_type"], n["model_node"] or "(inserted by ONNX Runtime)", f"{n['ms_per_run']:.4f}",
                      f"{n['share']:.1%}")
    con.print(table)
    con.print("top ops: " + ", ".join(f"{o['op_type']} {o['share']:.1%}" for o in pn["top_ops"]))


@click.command("compare")
@click.argument("model_a", type=click.Path(dir_okay=True, path_type=str))
@click.argument("model_b", type=click.Path(dir_okay=True, path_type=str))
@click.option("--hw", "hw", default=DEFAULT_PROFILE, show_default=True, metavar="PROFILE", help=_hw_help)
@_batch_option
@input_shape_option
@click.option("--memory", is_flag=True, help="Also measure each model's peak memory in fresh processes.")
@remote_options
@json_option
def compare_cmd(model_a: str, model_b: str, hw: str, batch_sizes: tuple[int, ...], input_shapes: dict, memory: bool,
                remote: str | None, ssh_options: tuple[str, ...], as_json: bool) -> None:
    """Time MODEL_A and MODEL_B interleaved (A B A B ..., same inputs) and put them side by side."""
    result = compare_models(model_a, model_b, remote_profiles([hw], remote, ssh_options)[0], batch_sizes=list(batch_sizes) or None,
                            input_shapes=input_shapes or None, memory=memory)
    if as_json:
        emit_json(result)
        return
    con = Console()
    a, b, ratios = result["a"], result["b"], result["ratios"]
    con.print(f"[bold]A[/bold] {a['model']}\n[bold]B[/bold] {b['model']}")
    con.print(f"profile {result['profile']} ({result['backend']}, {result['provider']}, {result['provenance']}), "
              f"runs interleaved A B A B")
    if "remote" in result:
        con.print(_device_line(result["remote"]))
    con.print(measured_on_line(result.get("measured_on")), markup=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("", "A", "B", "B/A"):
        table.add_column(col, justify="left" if not col else "right")

    def row(label: str, va: Any, vb: Any, fmt=human) -> None:
        ratio = f"{vb / va:.3f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else "n/a"
        table.add_row(label, fmt(va), fmt(vb), ratio)

    row("MACs", a["macs"], b["macs"])
    row("params", a["params"], b["params"])
    row("file size", a["file_bytes"], b["file_bytes"], lambda v: human(v, "B"))
    for c in result["comparisons"]:
        bs = c["batch_size"]
        for key in ("p50", "mean", "p90", "p99"):
            row(f"batch {bs} latency {key} (ms)", c["a"]["latency_ms"][key], c["b"]["latency_ms"][key], _ms)
        row(f"batch {bs} items/s", c["a"]["throughput_per_s"], c["b"]["throughput_per_s"], lambda v: f"{v:.1f}")
        if "peak_rss_bytes" in c["a"]:
            row(f"batch {bs} peak RSS", c["a"]["peak_rss_bytes"], c["b"]["peak_rss_bytes"], lambda v: human(v, "B"))
    con.print(table)
    for c in result["comparisons"]:
        speed = c["ratios"]["speedup_p50"]
        line = f"batch {c['batch_size']}: B is {speed:.2f}x {'faster' if speed >= 1 else 'slower'} than A (p50, {c['a']['runs']} runs each)"
        if ratios["macs_reduction"]:
            line += f"; MACs reduced {ratios['macs_reduction']:.2f}x, speedup/MACs-reduction {speed / ratios['macs_reduction']:.2f}"
        con.print(line)
    for s in result["skipped"]:
        con.print(f"[yellow]skipped:[/yellow] batch {s['batch_size']}: {s['reason']}")
    _notes(con, result["notes"])
