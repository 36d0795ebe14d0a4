"""Checked config sections: a dataclass per YAML section whose fields are checked against their
annotations (and `at_least` bounds) when built, so a typo or a bad value is a one-line
ConfigError before any process group starts. megaswift/config.py assembles the sections into
the run config; an algorithm declares its own section with these (train/algorithm.py).
"""

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Union

from megaswift.errors import ConfigError

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_NONE = ("none", "null")


def at_least(low, default):
    """A field whose value (when not None) must be >= `low`; checked in `Section.__post_init__`."""
    return field(default=default, metadata={"min": low})


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@functools.cache
def _hints(cls) -> dict:
    # get_type_hints resolves string annotations and is slow-ish; every build needs it.
    return typing.get_type_hints(cls)


def _optional_inner(tp):
    """`X` for `X | None` (or Optional[X]), else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return None


def _type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return type(args[0]).__name__
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return tp.__name__


def _check(value, tp, key: str, shown=None):
    """Return `value` if it fits `tp` (an int becomes a float for a float field), else raise.
    `shown` is the declared type to name in the message ('int or None', not just 'int')."""
    shown = shown or tp
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _check(value, inner, key, shown)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        # compare types too: True == 1, but `zero: true` is a mistake, not ZeRO-1
        if not any(value == a and type(value) is type(a) for a in args):
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if isinstance(value, list):
            try:
                return [_check(v, args[0], key) for v in value]
            except ConfigError:
                pass  # report the whole list below, not one element
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, which reads `lr: 1e-5` (no dot) as the string '1e-5'
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        # bool is a subclass of int; `steps: true` is a mistake
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' expects {_type_name(shown)}, got {value!r}")


def _parse(text: str, tp, key: str, shown=None):
    """Convert one command-line string to `tp`; the section's __post_init__ then checks it."""
    shown = shown or tp
    inner = _optional_inner(tp)
    if inner is not None:
        return None if text.strip().lower() in _NONE else _parse(text, inner, key, shown)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _parse(text, type(args[0]), key, shown)
    if origin is list:
        # accept the YAML flow form `[1, 2]` and the shell-friendly `1,2`
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        items = [s.strip().strip("'\"") for s in body.split(",")]
        try:
            return [_parse(s, args[0], key) for s in items if s]
        except ConfigError:  # name the whole list, not one element
            raise ConfigError(
                f"config key '{key}' expects {_type_name(shown)}, got {text!r}"
            ) from None
    if tp is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
    elif tp is str:
        return text
    else:
        try:
            return tp(text)
        except ValueError:
            pass
    raise ConfigError(f"config key '{key}' expects {_type_name(shown)}, got {text!r}")


def _require_field(cls, name: str, prefix: str, tail: str = "") -> None:
    """Raise unless `cls` has field `name`; `tail` is the rest of a dotted override key, kept so
    the message shows the whole key the user typed ('paralel.tp' -> 'parallel.tp')."""
    names = [f.name for f in dataclasses.fields(cls)]
    if name in names:
        return
    # match on this component alone: a shared 'parallel.' prefix would make every key look close
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        hint = f"did you mean '{_join(prefix, close[0])}{tail}'?"
    else:
        hint = "valid keys: " + ", ".join(_join(prefix, n) for n in names)
    raise ConfigError(f"unknown config key '{_join(prefix, name)}{tail}'; {hint}")


@dataclass(kw_only=True)
class Section:
    """Base of every section: checks each field against its annotation and `_at_least` bound."""

    _section: ClassVar[str] = ""
    """Dotted name of this section, used in error messages ('' for the root Config)."""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            key, tp, value = _join(self._section, f.name), hints[f.name], getattr(self, f.name)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, tp):
                    raise ConfigError(f"config key '{key}' expects a {tp.__name__}, got {value!r}")
                continue
            value = _check(value, tp, key)
            low = f.metadata.get("min")
            if low is not None and value is not None and value < low:
                raise ConfigError(f"{key} must be >= {low}; got {value}")
            setattr(self, f.name, value)

    def to_dict(self) -> dict:
        """Plain nested dicts and lists, safe for yaml.safe_dump and `load_config(base=...)`."""
        return dataclasses.asdict(self)
