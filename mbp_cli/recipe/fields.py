"""Reading a mapping into a frozen dataclass: types, ranges, choices and unknown keys checked,
every problem noted with its key path (stdlib only)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any

from mbp_cli.errors import suggest


def spec(default: Any = dataclasses.MISSING, *, minimum: float | None = None,
         above: float | None = None, maximum: float | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    """A recipe field with its default and the constraints the loader checks (`above`: an
    exclusive minimum)."""
    meta = {"minimum": minimum, "above": above, "maximum": maximum, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def build_section(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    """Build one section's dataclass; fields are reported missing only in a section written out."""
    is_written = isinstance(value, dict)
    if value is not None and not is_written:
        problems.append(f"{path}: expected a mapping, got {kind(value)}")
    if not is_written:
        value = {}
    unknown_keys(value, field_names(cls), path + ".", problems)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in value:
            if required:
                if is_written:
                    problems.append(f"{key}: missing")
                kwargs[f.name] = None  # the recipe is refused; None keeps later checks quiet
            continue
        checked = typed(_switch(value[f.name], f.metadata), hints[f.name], key, problems)
        if checked is not INVALID:
            _constraints(checked, f.metadata, key, problems)
            kwargs[f.name] = checked
        elif required:
            kwargs[f.name] = None
    return cls(**kwargs)


INVALID = object()


def _switch(value: Any, meta: typing.Mapping[str, Any]) -> Any:
    """YAML reads `on` and `off` as booleans: give them back to fields that choose on/off."""
    if isinstance(value, bool) and "on" in (meta.get("choices") or ()):
        return "on" if value else "off"
    return value


def typed(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    """Return `value` if it has the type `hint` names (ints pass as floats), else note a problem."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in allowed:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin in (str, dict, list) and isinstance(value, origin):
            return value
    wanted = " or ".join(_TYPE_WORDS[typing.get_origin(k) or k] for k in allowed)
    problems.append(f"{key}: expected {wanted}, got {value!r} ({kind(value)})")
    return INVALID


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a mapping", list: "a list", type(None): "null"}


def _constraints(value: Any, meta: typing.Mapping[str, Any], key: str,
                 problems: list[str]) -> None:
    minimum, choices = meta.get("minimum"), meta.get("choices")
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and not math.isfinite(value):
        problems.append(f"{key}: must be a finite number, got {value!r}")
        return
    if minimum is not None and is_number and value < minimum:
        problems.append(f"{key}: must be at least {minimum:g}, got {value!r}")
    if meta.get("above") is not None and is_number and value <= meta["above"]:
        problems.append(f"{key}: must be more than {meta['above']:g}, got {value!r}")
    if meta.get("maximum") is not None and is_number and value > meta["maximum"]:
        problems.append(f"{key}: must be at most {meta['maximum']:g}, got {value!r}")
    if choices and value is not None and value not in choices:
        problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}"
                        + suggest(str(value), choices))


def unknown_keys(mapping: dict, known: tuple[str, ...] | list[str], prefix: str,
                  problems: list[str]) -> None:
    for key in mapping:
        if key not in known:
            problems.append(f"{prefix}{key}: unknown key" + suggest(str(key), known, prefix))


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                          type(value).__name__)
