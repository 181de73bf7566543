"""``onnxprune cache info`` and ``onnxprune cache clear``: the on-disk cache of measured latency tables."""
from __future__ import annotations

import click

from ..profiling import diskcache
from .common import emit_json, json_option


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@click.group("cache")
def cache_cmd() -> None:
    """Show or empty onnxprune's cache of measured latency tables (platform cache dir, size-bounded)."""


@cache_cmd.command("info")
@json_option
def info_cmd(as_json: bool) -> None:
    """Print where the cache is, what it holds and its size bound."""
    res = diskcache.info()
    if as_json:
        emit_json(res)
        return
    click.echo(f"cache: {res['path']} ({_mib(res['bytes'])} of at most {_mib(res['max_bytes'])}; "
               f"set {diskcache.ENV_MAX_MB} to change, {diskcache.ENV_DIR} to move it)")
    for kind, k in res["kinds"].items():
        click.echo(f"  {kind}: {k['entries']} entr{'y' if k['entries'] == 1 else 'ies'}, {_mib(k['bytes'])} in {k['path']}")


@cache_cmd.command("clear")
@json_option
def clear_cmd(as_json: bool) -> None:
    """Remove every cached latency table (they are measured again when next needed)."""
    res = diskcache.clear()
    if as_json:
        emit_json(res)
        return
    click.echo(f"removed {res['removed']} cached entr{'y' if res['removed'] == 1 else 'ies'} "
               f"({_mib(res['bytes_freed'])}) from {res['path']}")
