"""Load a recipe by shipped name or path, apply ``--set key=value`` overrides, validate.

Every error is one line naming the file, the field and what was expected, e.g.::

    recipes/demo.yaml: field 'retrain.epoch': unknown key (expected one of: epochs, optimizer, ...)
"""
from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from ..core.errors import OnnxPruneError
from .schema import Method, Recipe, Stage
from ..resources import shipped


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe files by name."""

    return shipped("recipes")


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A path to an existing file, or the shipped recipe of that name (with or without ``.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.is_dir():
        raise OnnxPruneError(f"{p}: is a directory, expected a recipe YAML file or a shipped recipe name")
    shipped = shipped_recipes()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name[:-4] if p.name.endswith(".yml") else p.name
    if str(p.parent) in ("", ".") and stem in shipped:
        return shipped[stem]
    raise OnnxPruneError(f"{name_or_path}: no such recipe file, and not a shipped recipe "
                         f"(shipped: {', '.join(shipped) or 'none'})")


def load_recipe(name_or_path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override (``key.path=yaml-value``) and validate a recipe."""
    path = resolve_recipe(name_or_path)
    label = _label(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise OnnxPruneError(f"{label}: invalid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OnnxPruneError(f"{label}: cannot read recipe: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OnnxPruneError(f"{label}: expected a mapping of recipe fields at the top level, got {type(raw).__name__}")
    if "name" not in raw:
        raw["name"] = path.stem
    overridden = []
    for item in overrides:
        key, value = parse_override(item)
        check_key(key, label)
        set_path(raw, key, value, label)
        overridden.append(key)
    return validate_recipe(raw, label, overridden)


def validate_recipe(raw: dict, label: str = "recipe", overridden: Iterable[str] = ()) -> Recipe:
    """Validate a recipe mapping; a one-line :class:`OnnxPruneError` on the first problem."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise OnnxPruneError(format_validation_error(exc, label, overridden)) from None


def format_validation_error(exc: ValidationError, label: str, overridden: Iterable[str] = ()) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_internal_loc(p))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _expected_keys(err["loc"])
    elif ("input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list))
          and repr(err["input"]) not in msg):
        msg += f" (got {err['input']!r})"
    via = next((f" (set by --set {k})" for k in overridden if loc == k or loc.startswith(k + ".")), "")
    where = f"field '{loc}'" if loc else "recipe"
    return f"{label}: {where}: {msg}{via}"


def _is_internal_loc(p: Any) -> bool:
    # pydantic adds union-member / function tags to locations; users never wrote those
    return isinstance(p, str) and (p.startswith("function-") or p in ("dict[str,float]", "literal['sensitivity']"))


def _expected_keys(loc: tuple) -> str:
    model: Any = Recipe
    for part in loc[:-1]:
        model = _child_type(model, part)
        if model is None:
            return ""
    if isinstance(model, type) and issubclass(model, BaseModel):
        names = list(model.model_fields)
        if model is Method:
            names += [n for n in Stage.model_fields if n not in names]
        return f" (expected one of: {', '.join(names)})"
    return ""


def parse_override(item: str) -> tuple[str, Any]:
    """``'retrain.epochs=3'`` -> ``('retrain.epochs', 3)``; values are parsed as YAML."""
    if "=" not in item:
        raise OnnxPruneError(f"--set {item}: expected KEY=VALUE, e.g. retrain.epochs=3")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise OnnxPruneError(f"--set {item}: expected a dotted key such as retrain.epochs")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def check_key(key: str, label: str = "recipe") -> None:
    """Refuse a dotted key that does not exist in the schema, naming the offending part."""
    model: Any = Recipe
    done: list[str] = []
    for part in key.split("."):
        nxt = _child_type(model, part)
        if nxt is _UNKNOWN:
            hint = _expected_keys(tuple(done) + (part,))
            raise OnnxPruneError(f"{label}: --set {key}: unknown key '{'.'.join(done + [part])}'{hint}")
        done.append(part)
        model = nxt
        if model is None:  # free-form below here (dict[str, Any], options ...)
            return


_UNKNOWN = object()


def _child_type(tp: Any, part: Any) -> Any:
    """The type found at ``part`` below ``tp``; ``None`` when free-form, ``_UNKNOWN`` when invalid."""
    tp = _unwrap(tp)
    if tp is None:
        return None
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        fields = dict(tp.model_fields)
        if tp is Method:  # shorthand methods accept stage fields
            fields = {**Stage.model_fields, **fields}
        if part not in fields:
            return _UNKNOWN
        return fields[part].annotation
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(part, int) or (isinstance(part, str) and part.lstrip("-").isdigit()):
            return typing.get_args(tp)[0]
        return _UNKNOWN
    return None


def _unwrap(tp: Any) -> Any:
    """Optional[X] / X | None -> X; unions of a model and something else -> the model or list."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                return a
        for a in args:
            if typing.get_origin(a) is list:
                return a
        return None
    if origin is list or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return tp
    return None


def set_path(raw: dict, key: str, value: Any, label: str = "recipe") -> None:
    """Set ``raw[a][b][0][c] = value`` for ``key = 'a.b.0.c'``, creating mappings on the way."""
    parts = key.split(".")
    cur: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[:i]) or "recipe"
        if isinstance(cur, list):
            if not part.lstrip("-").isdigit():
                raise OnnxPruneError(f"{label}: --set {key}: '{here}' is a list; use an index such as {here}.0")
            idx = int(part)
            if not -len(cur) <= idx < len(cur):
                raise OnnxPruneError(f"{label}: --set {key}: index {idx} out of range ('{here}' has {len(cur)} items)")
            if last:
                cur[idx] = value
                return
            _expand_child(cur, idx, parts[i + 1])
            cur = cur[idx]
            continue
        if not isinstance(cur, dict):
            raise OnnxPruneError(f"{label}: --set {key}: '{here}' is a {type(cur).__name__}, not a mapping")
        if last:
            cur[part] = value
            return
        if cur.get(part) is None:
            cur[part] = {}
        _expand_child(cur, part, parts[i + 1])
        cur = cur[part]


def _expand_child(parent: Any, k: Any, next_part: str) -> None:
    """Rewrite short forms the next key part addresses in long form: a data spec string addressed as
    a mapping (``data.spec``) and a shorthand method addressed through ``stages``."""
    child = parent[k]
    if k == "data" and isinstance(child, str):
        parent[k] = {"spec": child}
    elif isinstance(child, dict) and next_part == "stages" and "stages" not in child and "kind" in child:
        head = {n: child.pop(n) for n in ("name", "schedule", "points") if n in child}
        parent[k] = {**head, "stages": [dict(child)]}


def _label(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        shipped = shipped_recipes()
        return f"recipes/{path.name}" if shipped.get(path.stem) == path else str(path)
