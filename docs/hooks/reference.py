"""Reference pages generated from the code itself, so the site can never miss a flag or a key.

A MkDocs hook (``mkdocs.yml``: ``hooks:``): at build time it adds ``reference/cli.md`` (every command
and option, from the click definitions), ``reference/recipe-schema.md`` and
``reference/hw-profile-schema.md`` (from the pydantic models). It then checks every hand-written
page: an ``onnxprune CMD ... --flag`` that names a flag CMD does not have fails the build, so a
renamed flag cannot leave the docs behind. ``tests/test_docs.py`` runs the same functions.
"""
from __future__ import annotations

import ast
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Iterable

import click

GENERATED = {
    "reference/cli.md": "cli_reference",
    "reference/recipe-schema.md": "recipe_reference",
    "reference/hw-profile-schema.md": "hw_profile_reference",
}


# ---- commands ------------------------------------------------------------------------------------
def commands() -> dict[str, click.Command]:
    """Every ``onnxprune`` command, by name (imports each command module); a group's subcommands
    follow it as ``"group sub"``."""
    from onnxprune.cli import cli

    ctx = click.Context(cli)
    out: dict[str, click.Command] = {}
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        out[name] = cmd
        if isinstance(cmd, click.Group):
            sub_ctx = click.Context(cmd, parent=ctx)
            out.update({f"{name} {sub}": cmd.get_command(sub_ctx, sub) for sub in cmd.list_commands(sub_ctx)})
    return out


def command_flags(cmd: click.Command) -> set[str]:
    """Every option string of ``cmd`` (``--ratio``, ``-o``, ``--no-gzip`` ...); for a group, its
    subcommands' too (a page may write ``onnxprune cache clear --json``)."""
    out = {"--help", "-h"}
    for p in cmd.params:
        if isinstance(p, click.Option):
            out.update(p.opts)
            out.update(p.secondary_opts)
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            out |= command_flags(sub)
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _option_row(p: click.Option) -> str:
    names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    if p.is_flag:
        kind = "flag"
    elif isinstance(p.type, click.Choice):
        kind = " \\| ".join(f"`{c}`" for c in p.type.choices)
    else:
        kind = p.type.name.upper() if p.type is not None else ""
    if p.multiple:
        kind += " (repeatable)"
    default = p.default if p.show_default is not False else None
    if callable(default) or "UNSET" in repr(default) or default in (None, (), [], False):
        default_s = ""
    else:
        default_s = f"`{default}`"
    return f"| {names} | {kind} | {default_s} | {_cell(p.help or '')} |"


def cli_reference() -> str:
    """The command-line reference, one section per command."""
    from onnxprune.cli import cli

    lines = ["# Command-line reference", "",
             "Generated from the click definitions at build time: every command and every flag is here.",
             "All commands answer bad input with one `error:` line and a non-zero exit "
             "([exit codes](exit-codes.md)); `--json` prints one JSON object ([JSON output](json-output.md)).", "",
             "Global options: `onnxprune [--debug] [--version] COMMAND ...` (`--debug` shows the traceback of an "
             "internal error).", ""]
    for name, cmd in commands().items():
        if isinstance(cmd, click.Group):
            lines += [f"## `onnxprune {name}`", "", inspect.cleandoc(cmd.help or ""), "",
                      "Subcommands: " + ", ".join(f"`{name} {sub}`" for sub in sorted(cmd.commands)), ""]
            continue
        ctx = click.Context(cmd, info_name=f"onnxprune {name}", parent=click.Context(cli, info_name="onnxprune"))
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        lines += [f"## `onnxprune {name}`", "", inspect.cleandoc(cmd.help or "").replace("\b\n", ""), "",
                  "```text", f"onnxprune {name} {usage}", "```", ""]
        args = [p for p in cmd.params if isinstance(p, click.Argument)]
        if args:
            lines += ["Arguments: " + ", ".join(f"`{a.human_readable_name}`" for a in args), ""]
        opts = [p for p in cmd.params if isinstance(p, click.Option)]
        if opts:
            lines += ["| option | value | default | meaning |", "|---|---|---|---|"]
            lines += [_option_row(p) for p in opts]
            lines.append("")
    return "\n".join(lines) + "\n"


# ---- schemas -------------------------------------------------------------------------------------
def _comments(cls: type) -> dict[str, str]:
    """``#:`` comment lines above each field of ``cls`` (where a Field has no description)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(inspect.cleandoc(src) if src.startswith(" ") else src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            i, doc = node.lineno - 2, []
            while i >= 0 and lines[i].strip().startswith("#:"):
                doc.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if doc:
                out[node.target.id] = " ".join(doc)
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple, set):
        return f"list of {_type_name(typing.get_args(tp)[0])}" if typing.get_args(tp) else "list"
    if origin is dict:
        k, v = typing.get_args(tp) or (str, Any)
        return f"map {_type_name(k)} → {_type_name(v)}"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _models_in(tp: Any) -> Iterable[type]:
    from pydantic import BaseModel

    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield tp
    for a in typing.get_args(tp):
        yield from _models_in(a)


def schema_reference(root: type, title: str, intro: str) -> str:
    """A table per pydantic model reachable from ``root``: key, type, default, meaning."""
    from pydantic_core import PydanticUndefined

    lines = [f"# {title}", "", intro, ""]
    seen: list[type] = []
    todo = [root]
    while todo:
        cls = todo.pop(0)
        if cls in seen:
            continue
        seen.append(cls)
        notes = _comments(cls)
        lines += [f"## `{cls.__name__}`", "", inspect.cleandoc(cls.__doc__ or ""), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in cls.model_fields.items():
            if f.exclude:
                continue
            if f.default_factory is not None:
                default = f.default_factory()
            elif f.default is PydanticUndefined:
                default = "required"
            else:
                default = f.default
            default_s = "**required**" if default == "required" else ("" if default is None else f"`{default!r}`")
            lines.append(f"| `{name}` | {_type_name(f.annotation)} | {_cell(default_s)} | "
                         f"{_cell(f.description or notes.get(name, ''))} |")
            todo += [m for m in _models_in(f.annotation) if m not in seen]
        lines.append("")
    return "\n".join(lines) + "\n"


def recipe_reference() -> str:
    from onnxprune.recipes.schema import Recipe
    import onnxprune.recipes.schema as mod

    return schema_reference(Recipe, "Recipe schema", "Generated from `onnxprune/recipes/schema.py`. A recipe is YAML "
                            "validated by these models; unknown keys are errors.\n\n```text\n"
                            + inspect.cleandoc(mod.__doc__ or "").split("\n", 1)[1].strip() + "\n```")


def hw_profile_reference() -> str:
    from onnxprune.profiling.hw_profile import HwProfile

    return schema_reference(HwProfile, "Hardware-profile schema",
                            "Generated from `onnxprune/profiling/hw_profile.py`. A hardware profile is YAML "
                            "(`hw_profiles/*.yaml`, or a path given to `--hw`); unknown keys are errors, and every "
                            "error names the file and the field. A profile is data: nothing in it is ever executed "
                            "(see [Security model](../security.md)).")


def generate() -> dict[str, str]:
    """Every generated page: ``{path under docs/: markdown}``."""
    return {path: globals()[fn]() for path, fn in GENERATED.items()}


# ---- checks of hand-written pages ----------------------------------------------------------------
_CMD_RE = re.compile(r"onnxprune ([a-z][a-z-]*)\b([^\n`|]*)")


def unknown_flags(text: str, known: dict[str, set[str]]) -> list[str]:
    """``onnxprune CMD ... --flag`` mentions where CMD has no such flag (or no such command)."""
    bad = []
    for m in _CMD_RE.finditer(text):
        cmd, rest = m.group(1), m.group(2)
        if cmd not in known:
            continue  # prose ("onnxprune makes ...") is not a command line
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest):
            if flag not in known[cmd]:
                bad.append(f"onnxprune {cmd} {flag}")
    return bad


def check_pages(pages: dict[str, str]) -> list[str]:
    known = {name: command_flags(cmd) for name, cmd in commands().items()}
    return [f"{page}: {b}" for page, text in pages.items() for b in unknown_flags(text, known)]


# ---- MkDocs hooks --------------------------------------------------------------------------------
def on_files(files, config):  # noqa: D103 - MkDocs hook
    from mkdocs.structure.files import File

    for path, text in generate().items():
        files.append(File.generated(config, path, content=text))
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: D103 - MkDocs hook
    if page.file.src_uri not in GENERATED:
        bad = check_pages({page.file.src_uri: markdown})
        if bad:
            from mkdocs.exceptions import PluginError

            raise PluginError("flags that no command has: " + "; ".join(bad))
    return markdown


def main() -> None:  # pragma: no cover - `python docs/hooks/reference.py OUTDIR` writes the pages
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs-generated")
    for path, text in generate().items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(text)


if __name__ == "__main__":  # pragma: no cover
    main()
