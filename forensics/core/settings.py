"""Typed settings from what a user types or passes: one rule for every dataclass of knobs.

A settings dataclass declares its fields with types and defaults; :func:`build_settings` makes one from a mapping
of overrides (strings from a command line or Python values from the API), converting each value to its field's
type and refusing, in one line that names where it came from, an unknown name, a value of the wrong type or one
below the field's floor (``field(metadata={"min": 1})``; numbers default to a floor of 0). Nothing is silently
replaced by a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from forensics.core.errors import ForensicsError

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NONE = {"none", "null"}


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a settings dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe(hint: Any) -> str:
    """A type hint in words, for messages ("an integer", "a number or none", ...)."""
    args = typing.get_args(hint)
    if _is_union(hint):
        return " or ".join("none" if a is type(None) else describe(a) for a in args)
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return f"a comma-separated list of {describe(args[0]).removeprefix('a ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text"}.get(hint, str(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``; raises ValueError when it is not one (strings are parsed, Python values checked)."""
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
            raise ValueError
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg)
            except ValueError:
                continue
        raise ValueError
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):  # nested settings: an object, or a mapping of it
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build_settings(hint, value, hint.__name__)
        raise ValueError
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        (item, *_rest) = typing.get_args(hint)
        parts = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
        if not isinstance(parts, (list, tuple)) or not parts:
            raise ValueError
        items = [coerce(p, item) for p in parts]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if hint is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if hint is float:
        if isinstance(value, bool):
            raise ValueError
        number = float(value.strip()) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError
        return float(number)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError
    raise ValueError


def build_settings(cls: type, overrides: Mapping[str, Any] | None = None, where: str = "setting", base: Any = None):
    """An instance of the settings dataclass ``cls``: ``base`` (or the defaults) with ``overrides`` applied, each
    converted to its field's type; a wrong name, type or a value below the field's floor is one ForensicsError
    line naming ``where`` (e.g. ``--detector-setting trigger-inversion``), the setting and what it takes."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    values: dict[str, Any] = {}
    for name, raw in (overrides or {}).items():
        key = str(name).strip().replace("-", "_")
        if key not in fields:
            raise ForensicsError(f"{where}: unknown setting {name!r}; valid: {', '.join(fields)}")
        try:
            value = coerce(raw, hints[key])
        except (ValueError, TypeError, AttributeError):
            raise ForensicsError(f"{where}.{key} must be {describe(hints[key])}, got {raw!r}") from None
        floor = fields[key].metadata.get("min", 0)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < floor:
            raise ForensicsError(f"{where}.{key} must be at least {floor}, got {raw!r}")
        values[key] = value
    start = base if base is not None else cls()
    return dataclasses.replace(start, **values)


def parse_assignments(pairs: Iterable[str], flag: str) -> dict[str, dict[str, str]]:
    """``NAME.KEY=VALUE`` strings (e.g. ``trigger-inversion.steps=20``) as ``{NAME: {KEY: VALUE}}``; a string
    of another shape is a one-line error naming ``flag``."""
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        text = str(pair)
        head, sep, value = text.partition("=")
        name, dot, key = head.strip().rpartition(".")
        if not sep or not dot or not name or not key:
            raise ForensicsError(f"{flag} {text!r} must look like NAME.KEY=VALUE (e.g. trigger-inversion.steps=20)")
        out.setdefault(name.strip(), {})[key.strip()] = value.strip()
    return out


def parse_assignment_text(text: str | None, field: str) -> dict[str, dict[str, str]]:
    """A text box of ``NAME.KEY=VALUE`` assignments, one per line or separated by ``;`` (a value may hold commas,
    as a list of families does), as :func:`parse_assignments` reads them; blank lines are skipped."""
    pieces = [p for line in str(text or "").splitlines() for p in line.split(";")]
    return parse_assignments([p for p in pieces if p.strip()], field)


def at_least(floor: float, default: Any) -> Any:
    """A settings field with ``default`` whose values below ``floor`` are refused (counts that must be >= 1)."""
    return dataclasses.field(default=default, metadata={"min": floor})
