"""The ``onnxprune`` command line.

Commands live in ``onnxprune/commands/`` (one module each) and are imported only when invoked, so
``inspect``/``prune``/``profile`` start fast and run on an edge device without torch installed.
Exit codes: 0 ok, 1 bad input or failed check, 2 usage error, 3 optional backend unavailable,
70 internal error (a bug: rerun with ``--debug`` for the traceback).
"""
from __future__ import annotations

import importlib
import sys
import traceback
import warnings

import click

from .core.errors import OnnxPruneError

#: command name -> "module:attribute" (relative to onnxprune.commands)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect_cmd:inspect_cmd", "Params, MACs, shapes and sparsity of a model."),
    "analyze": ("analyze_cmd:analyze_cmd", "Channel-coupling groups and why any are unprunable."),
    "prune": ("prune_cmd:prune_cmd", "Structured, unstructured or N:M pruning of a model."),
    "bridge-check": ("bridge_cmd:bridge_check_cmd", "Check the ONNX->torch bridge against ONNX Runtime."),
    "finetune": ("finetune_cmd:finetune_cmd", "Retrain a (pruned) model in PyTorch and write it back."),
    "eval": ("eval_cmd:eval_cmd", "Accuracy of a model with ONNX Runtime on a dataset."),
    "profile": ("profile_cmd:profile_cmd", "Measure latency, memory and size on hardware profiles."),
    "compare": ("profile_cmd:compare_cmd", "Interleaved latency comparison of two models."),
    "run": ("run_cmd:run_cmd", "Run a recipe end to end and write the report."),
    "report": ("run_cmd:report_cmd", "Re-render the report of a run directory."),
    "compare-runs": ("run_cmd:compare_runs_cmd", "Put two run directories side by side."),
    "quantize": ("quantize_cmd:quantize_cmd", "INT8 (QDQ) or FP16 quantization, checked against the float model."),
    "optimize": ("optimize_cmd:optimize_cmd", "From a model, a speed goal and a quality bound to the model to ship."),
    "demo": ("demo_cmd:demo_cmd", "Train a small CNN on digits, prune, retrain, profile and report."),
    "cache": ("cache_cmd:cache_cmd", "Show (info) or empty (clear) the cache of measured latency tables."),
}


#: Optional packages (import name) -> the extra that installs them (a missing one is exit 3, not a
#: crash). Any other missing module, onnxprune's own above all, is a bug and says so (exit 70).
OPTIONAL_PACKAGES = {"torch": "train", "torch_pruning": "train", "sklearn": "train", "matplotlib": "report",
                     "PIL": "images", "ray": "ray", "tensorrt": "tensorrt", "pynvml": "gpu"}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMANDS) | set(self.commands))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List commands from the table, without importing them (keeps ``--help`` instant)."""
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        # no guard: a missing optional package is exit 3 with its install line (main), and a
        # missing onnxprune module is a bug (exit 70), never a command reported as unavailable
        return getattr(importlib.import_module(f"onnxprune.commands.{module}"), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="onnxprune")
def cli(debug: bool) -> None:
    """onnxprune: make ONNX models smaller and faster for deployment, and measure it honestly."""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """onnxprune's own warnings as one ``warning: ...`` line on stderr (others as Python shows them)."""
    if category.__module__.startswith("onnxprune"):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear error line and a non-zero exit instead of tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    debug = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="onnxprune", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("aborted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_PACKAGES.get((exc.name or "").split(".")[0])
        if extra is None:
            _internal_error(exc, debug)
        click.echo(f"error: this needs the optional package {exc.name!r}: pip install 'onnxprune[{extra}]'", err=True)
        sys.exit(3)
    except OnnxPruneError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - last line of defence: never a bare traceback
        _internal_error(exc, debug)
    sys.exit(rv if isinstance(rv, int) else 0)


def _internal_error(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    msg = str(exc).splitlines()[0] if str(exc) else ""
    click.echo(f"internal error: {type(exc).__name__}: {msg} (a bug in onnxprune; rerun with --debug)", err=True)
    sys.exit(70)


if __name__ == "__main__":  # pragma: no cover
    main()
