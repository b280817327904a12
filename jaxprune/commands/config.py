"""Configs on the command line: config files, typed ``key=value`` overrides, and flags made from
a config dataclass's fields (with their comments as help and their defaults shown).

A job is built in one order everywhere: the dataclass defaults, then a config file's
``get_config()``, then the flags, then the ``--set`` overrides. Every value is checked against
the field's type before any work starts, so ``--set epochs=abc`` is one clear error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """A command line that cannot be run; the message says what to change."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


def load_config(path: str | Path) -> Any:
    """`get_config()` of a config file (one per experiment, as in experiments/)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"jaxprune_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"{path} has no get_config() function.")
    return module.get_config()


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Applies ``a.b=value`` overrides to a (nested, frozen) dataclass config.

    Values are Python literals (``0.1``, ``(1, 2)``, ``None``, ``True``) or plain strings, and
    must fit the field's type.

    Raises:
      UsageError: a malformed override, an unknown field (the fields are listed) or a value of
        the wrong type.
    """
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} must look like key=value (e.g. epochs=3).")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        config = _replace_path(config, key.split("."), value, key)
    return config


def _replace_path(obj: Any, keys: list[str], value: Any, full: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise UsageError(f"{full!r}: {keys[0]!r} is inside a value that has no fields.")
    names = [f.name for f in dataclasses.fields(obj)]
    if keys[0] not in names:
        raise UsageError(
            f"{full!r}: {type(obj).__name__} has no field {keys[0]!r}; fields are {names}."
        )
    hint = typing.get_type_hints(type(obj))[keys[0]]
    if len(keys) > 1:
        inner = getattr(obj, keys[0])
        if inner is None:
            kind = _dataclass_in(hint)
            if kind is None:
                raise UsageError(f"{full!r}: {keys[0]!r} holds no fields.")
            inner = kind()
        value = _replace_path(inner, keys[1:], value, full)
    else:
        value = coerce(value, hint, full)
    return dataclasses.replace(obj, **{keys[0]: value})


def _dataclass_in(hint: Any) -> type | None:
    for arg in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def coerce(value: Any, hint: Any, name: str) -> Any:
    """`value` checked (and converted where lossless: int -> float, list -> tuple) against a
    type hint; raises `UsageError` naming the field and the expected type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return coerce(value, arg, name)
            except UsageError as error:
                errors.append(error)
        raise UsageError(f"{name}={value!r}: expected {_describe(hint)}.")
    if hint is type(None):
        if value is None:
            return None
        raise UsageError(f"{name}={value!r}: expected None.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{name}={value!r}: expected True or False.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{name}={value!r}: expected an integer.")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"{name}={value!r}: expected a number.")
    if hint is str:
        if isinstance(value, str):
            return value
        return str(value)  # a literal-looking string such as "12"
    if origin is tuple or hint is tuple:
        if not isinstance(value, list | tuple):
            raise UsageError(f"{name}={value!r}: expected a tuple, e.g. (1, 2).")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise UsageError(f"{name}={value!r}: expected {len(args)} values.")
        inner = args[0] if args else Any
        return tuple(
            coerce(v, args[i] if args and args[-1] is not Ellipsis else inner, name)
            for i, v in enumerate(value)
        )
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise UsageError(f"{name}={value!r}: expected a dict, e.g. {{'conv1': 4}}.")
        return dict(value)
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(f"{name}={value!r}: expected one of {list(args)}.")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise UsageError(f"{name}: set its fields one by one, e.g. {name}.<field>=...")
    return value


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint)]
    return " or ".join(getattr(a, "__name__", str(a)).replace("NoneType", "None") for a in args)


# --------------------------------------------------------------------------------------------
# Flags from a config dataclass


def field_comments(cls: type) -> dict[str, str]:
    """The comment lines written above each field of a dataclass, by field name."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^\s*([a-z_][a-z0-9_]*)\s*:", line)
        if match and pending:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def _flag_type(hint: Any) -> Any | None:
    """The argparse type of a field that can be a flag (scalars), or None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = (
        args[0]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
        else hint
    )
    return base if base in (int, float, str, bool) else None


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """A command-line flag that sets one config field."""

    dest: str
    field: str
    kind: Any
    help: str


def add_config_flags(
    group: Any, cls: type, *, prefix: str = "", skip: Sequence[str] = ()
) -> list[FlagSpec]:
    """Adds a flag for every scalar field of dataclass `cls` to an argparse group.

    Flags are the field names with dashes (``--min-channels``), their help is the field's
    comment with its default; nested configs are set with ``--set field.subfield=value``.

    Returns:
      What each flag sets, for `overrides_from_flags`.
    """
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    specs = []
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = _flag_type(hints[field.name])
        if kind is None:
            continue
        default = getattr(defaults, field.name)
        dest = f"{prefix}{field.name}"
        help_text = f"{comments.get(field.name, '')} (default: {default!r})".strip()
        # argparse %-formats help texts: a comment's literal "5%" must reach it as "5%%".
        escaped = help_text.replace("%", "%%")
        name = "--" + field.name.replace("_", "-")
        if kind is bool:
            group.add_argument(
                name, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=escaped
            )
        else:
            group.add_argument(
                name,
                dest=dest,
                type=kind,
                default=None,
                help=escaped,
                metavar=kind.__name__.upper(),
            )
        specs.append(FlagSpec(dest, field.name, kind, help_text))
    return specs


def overrides_from_flags(
    args: argparse.Namespace, specs: Sequence[FlagSpec], path: str = ""
) -> list[str]:
    """``field=value`` overrides for the flags that were given."""
    overrides = []
    for spec in specs:
        value = getattr(args, spec.dest, None)
        if value is not None:
            overrides.append(f"{path}{spec.field}={value!r}")
    return overrides
