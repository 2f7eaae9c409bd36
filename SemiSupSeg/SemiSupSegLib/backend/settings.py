"""Typed settings: a user's values turned into a dataclass's field types, and checked against
the limits its fields declare.

``TrainConfig`` and every method's options dataclass use these rules, so a value is read and
checked the same way wherever it is set (``--set``, a job's settings, a model's config.json),
and a bad one gets the same message: the setting's name, the value, and what it must be.

A field declares its limits in its metadata under ``CHECK`` (see ``checked``): a ``Range`` or
a ``OneOf``; ``None`` passes every check (an optional setting left unset).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple, Type, TypeVar

from SemiSupSegLib.backend.errors import ConfigError
from SemiSupSegLib.protocol import shorten

#: The key of a field's metadata that holds its ``Check``.
CHECK = "check"

Settings = TypeVar("Settings")


class Check(Protocol):
    """A limit on a setting's values."""

    def problem(self, value: Any) -> Optional[str]:
        """What ``value`` must be ("must be ..."), or None when it is fine."""
        ...


@dataclass(frozen=True)
class Range:
    """A finite number from ``low`` to ``high``; ``*_open`` leaves that end out. ``note`` is
    added to the message (e.g. what 0 means)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def problem(self, value: Any) -> Optional[str]:
        if not math.isfinite(value):
            return "must be a finite number"
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if not (too_low or too_high):
            return None
        return f"must be {self.describe()}" + (f" ({self.note})" if self.note else "")

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            if self.low == 0:
                return "a positive number" if self.low_open else "0 or more"
            return f"more than {low}" if self.low_open else f"at least {low}"
        if self.low == -math.inf:
            return f"below {high}" if self.high_open else f"at most {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {high}{right}"


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: Tuple[Any, ...]

    def problem(self, value: Any) -> Optional[str]:
        if value in self.choices:
            return None
        return f"must be one of {', '.join(str(c) for c in self.choices)}"


def checked(default: Any, check: Check) -> Any:
    """A dataclass field with ``default`` whose values ``check`` limits."""
    return dataclasses.field(default=default, metadata={CHECK: check})


def check_fields(settings: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first field of the dataclass instance ``settings`` whose value
    its ``CHECK`` refuses; ``prefix`` goes before the field's name (``method.``)."""
    for field in dataclasses.fields(settings):
        check = field.metadata.get(CHECK)
        value = getattr(settings, field.name)
        if check is None or value is None:
            continue
        problem = check.problem(value)
        if problem:
            raise ConfigError(f"{prefix}{field.name} {problem}, got {_shown(value)}")


def setting_value(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` of setting ``name`` (JSON gives lists for tuples, text for
    anything on a command line); ConfigError naming the setting when it cannot be."""
    try:
        return coerce(value, hint)
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(
            f"setting {shorten(repr(name))}: {shorten(repr(value))} is not valid "
            f"({shorten(str(err))})"
        ) from None


def settings_from(
    cls: Type[Settings], values: Mapping[str, Any], prefix: str = "", owner: str = ""
) -> Settings:
    """The dataclass ``cls`` with ``values`` (by field name) over its defaults, each turned into
    its field's type, then checked.

    Args:
        cls: a dataclass whose fields all have defaults.
        values: the settings given, by field name.
        prefix: what precedes a field's name where the user sets it (``method.``).
        owner: what the settings belong to, for the message on an unknown name.

    Raises:
        ConfigError: an unknown name, or a value of the wrong type or out of its limits.
    """
    hints = type_hints(cls)
    unknown = sorted(str(name) for name in values if name not in hints)
    if unknown:
        raise ConfigError(unknown_setting(prefix + unknown[0], [prefix + n for n in hints], owner))
    settings = cls(**{n: setting_value(prefix + n, v, hints[n]) for n, v in values.items()})
    check_fields(settings, prefix)
    return settings


def unknown_setting(name: str, known: list, owner: str = "") -> str:
    """The message for a setting ``name`` that is none of ``known`` (of ``owner``)."""
    of = f" of {owner}" if owner else ""
    if not known:
        return f"unknown setting {shorten(repr(name))}: {owner} has no settings of its own"
    return f"unknown setting {shorten(repr(name))}{of}; known settings: {sorted(known)}"


@functools.cache
def type_hints(cls: type) -> Dict[str, Any]:
    """The types of the dataclass ``cls``'s fields that take a value, by name."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls) if field.init}


def coerce(value: Any, hint: Any) -> Any:
    """``value`` converted to the type ``hint``; TypeError or ValueError when it cannot be.

    Understood: bool, int, float, str, Optional[...], Tuple[X, ...] (from a list, or text such
    as ``32x48x32`` or ``1,1,2``), Dict (an object, as given) and Any.
    """
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in arguments:
            return None
        (inner,) = [a for a in arguments if a is not type(None)]
        return coerce(value, inner)
    if hint is Any:
        return value
    if hint is bool:
        return _boolean(value)
    if isinstance(value, bool):
        raise ValueError("expected a number, not true or false")
    if hint is int:
        return _whole_number(value)
    if hint is float:
        return float(value)
    if hint is str:
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("x", ",").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError("expected a list of numbers")
        return tuple(coerce(v, arguments[0]) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError("expected an object")
        return dict(value)
    raise TypeError(f"settings of type {hint} are not supported")


def _boolean(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    return bool(value)


def _whole_number(value: Any) -> int:
    if isinstance(value, str):
        value = float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("expected a whole number")
    return int(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _shown(value: Any) -> str:
    return shorten(repr(value) if isinstance(value, str) else str(value))
