"""Settings as frozen dataclass fields, checked strictly: a pipeline section (config.py), a sweep
table (sweep/config.py) and a method's own options (methods/) are each one dataclass whose fields
say their default and what they accept; `build` makes one from a key = value table, naming the
key at fault in one line."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field

from sherl_pipe.errors import SherlError


def choice(default, *choices):
    return field(default=default, metadata={"choices": (default, *choices)})


def at_least(default, minimum):
    return field(default=default, metadata={"min": minimum})


def between(default, minimum, maximum, below_max: bool = False):
    """A number in [minimum, maximum] (or [minimum, maximum) with below_max)."""
    return field(default=default, metadata={"min": minimum, "max": maximum, "below_max": below_max})


def options():
    """A table of a remote filesystem's options (location.py), which may hold credentials: they are
    used, never written or printed (config.section_to_dict leaves them out), and never compared."""
    return field(default_factory=dict, hash=False, compare=False, repr=False, metadata={"options": True})


def column(default):
    """A column name; with data.header = false, its 0-based position (an integer in the file)."""
    return field(default=default, metadata={"column": True})


def build(cls: type, values: dict, where: str, known: str = ""):
    """CLS from a key = value table, every value checked; WHERE prefixes each key in a message
    ("FILE: train"), KNOWN lists the keys an unknown one is told of (default: CLS's fields)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SherlError(f"{where}: unknown key '{unknown[0]}'; known: {known or ', '.join(fields)}")
    return cls(**{key: checked(value, fields[key], hints[key], f"{where}.{key}") for key, value in values.items()})


def checked(value, f: dataclasses.Field, hint, where: str):
    """VALUE as field F takes it (coerced to its type, within its choices and bounds)."""
    meta = f.metadata
    if meta.get("column") and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)  # a column's position in a file without a header
    return check_value(coerce(value, hint, where), meta, where)


def check_value(value, meta, where: str):
    if "choices" in meta and value not in meta["choices"]:
        raise SherlError(f"{where} = {value!r} is not one of {', '.join(map(repr, meta['choices']))}")
    if "min" in meta and value < meta["min"]:
        raise SherlError(f"{where} = {value!r} must be >= {meta['min']}")
    if "max" in meta and (value >= meta["max"] if meta["below_max"] else value > meta["max"]):
        raise SherlError(f"{where} = {value!r} must be {'<' if meta['below_max'] else '<='} {meta['max']}")
    return value


def coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):  # `float | None`
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return coerce(value, inner, where)
    if origin is tuple:
        (inner, _) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise SherlError(f"{where}: expected a list, got {value!r}")
        return tuple(coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise SherlError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SherlError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SherlError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SherlError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise SherlError(f"{where}: expected a table, for example {{endpoint_url = \"http://127.0.0.1:9000\"}}, "
                             f"got a {type(value).__name__}")
        return dict(value)
    raise TypeError(f"unsupported config type {hint}")  # a bug in the dataclass, not user input


def as_written(value):
    """A field's value as a pipeline file, a JSON file or a report writes it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value
