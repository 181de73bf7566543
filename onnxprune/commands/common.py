"""Options and output helpers shared by the CLI commands."""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from ..core.errors import OnnxPruneError
from ..core.jsonio import json_default
from ..core.shapes import parse_input_shapes
from ..profiling import ssh_target


def _shapes_callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    try:
        return parse_input_shapes(value)
    except OnnxPruneError as exc:
        raise click.BadParameter(str(exc)) from exc


def input_shape_option(f: Callable) -> Callable:
    """``--input-shape NAME=1x3x224x224`` (repeatable) -> ``input_shapes: dict``."""
    return click.option("--input-shape", "input_shapes", multiple=True, callback=_shapes_callback, metavar="NAME=DIMS",
                        help="Fix an input's shape, e.g. input=1x3x224x224 (repeatable).")(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")(f)


model_argument = click.argument("model", type=click.Path(dir_okay=True, path_type=str))


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (stable key order as built; numpy scalars converted)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=json_default) + "\n")


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23 M' (None -> 'n/a')."""
    if n is None:
        return "n/a"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".strip()


def _checked(check: str) -> Callable:
    """A click callback that refuses a bad ``--remote``/``--ssh-option`` in one line, before any work
    (``check`` names the function of :mod:`onnxprune.profiling.ssh_target` that validates one value)."""
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        for v in (value if isinstance(value, tuple) else () if value is None else (value,)):
            try:
                getattr(ssh_target, check)(v)
            except ValueError as exc:
                raise OnnxPruneError(f"{param.opts[0]}: {exc}") from None
        return value
    return callback


def remote_options(f: Callable) -> Callable:
    """``--remote USER@HOST[:PORT]`` and ``--ssh-option KEY=VALUE``: measure on a device over SSH."""
    f = click.option("--ssh-option", "ssh_options", multiple=True, metavar="KEY=VALUE", callback=_checked("check_ssh_option"),
                     help="Passed to ssh/scp as -o KEY=VALUE (repeatable), e.g. IdentityFile=~/.ssh/board; options "
                          "that run programs (ProxyCommand...) belong in ~/.ssh/config.")(f)
    return click.option("--remote", default=None, metavar="USER@HOST[:PORT]", callback=_checked("parse_target"),
                        help="Measure on this device over SSH (it needs 'pip install onnxprune'); replaces the "
                             "profiles' remote:.")(f)
