"""Per-method options on the command line, in one syntax generated from the methods' option dataclasses.

``--set METHOD.OPTION=VALUE`` (repeatable: ``--set tent.lr=5e-4 --set alpha_bn.alpha=0.2``) sets one option of one
method; the value is parsed by the option's type (bool: true/false, a choice, int, float, str) and checked like
``tta.adapt``'s keyword options, with an error naming the method's options or the allowed values. Fields marked
``cli=False`` (objects such as cafa's source statistics) are supplied by the runner instead; fields marked
``cli="deprecated"`` can still be set for one minor version but are not listed (the adapter warns when used).

The older flags, one per method and option (``--tent-lr 5e-4``), still work for one minor version: they are hidden
from ``--help`` and warn that ``--set`` replaces them.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
import warnings
from typing import Any, Literal, Union, get_args, get_origin

import tta

SET_DEST = "method_settings"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _flag(method: str, name: str) -> str:
    return f"--{method}-{name.replace('_', '-')}"


def _dest(method: str, name: str) -> str:
    return f"opt__{method}__{name}"


def cli_fields(method: str, deprecated: bool = False) -> list[tuple[dataclasses.Field, Any]]:
    """The options of ``method`` that the command line can set (with ``deprecated``: also those kept for one
    version), with their type hints, ``X | None`` read as ``X``."""
    cls = tta.method_options(method)
    hints = typing.get_type_hints(cls)
    shown = (True, "deprecated") if deprecated else (True,)
    fields = [(f, _without_none(hints[f.name])) for f in dataclasses.fields(cls)
              if f.metadata.get("cli", True) in shown]
    return [(f, hint) for f, hint in fields if hint in (bool, int, float, str) or get_origin(hint) is Literal]


def _without_none(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        rest = [arg for arg in get_args(hint) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def type_name(hint: Any) -> str:
    """How an option's type reads in help and errors: ``float``, ``bool``, ``adam|sgd``."""
    if get_origin(hint) is Literal:
        return "|".join(str(a) for a in get_args(hint))
    return hint.__name__


def parse_value(method: str, name: str, hint: Any, text: str) -> Any:
    """``text`` as a value of the option's type; a ValueError that names the option and what it accepts."""
    where = f"{method}.{name}"
    if hint is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"--set {where}={text}: {where} is a bool; give true or false")
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        for choice in choices:
            if text == str(choice):
                return choice
        raise ValueError(f"--set {where}={text}: choose one of {', '.join(map(str, choices))}")
    try:
        return hint(text)
    except ValueError:
        raise ValueError(f"--set {where}={text}: {where} is a {hint.__name__}") from None


def parse_setting(text: str) -> tuple[str, str, Any]:
    """``METHOD.OPTION=VALUE`` -> (method, option, typed value), checked against the registered methods."""
    key, sep, value = text.partition("=")
    method, dot, name = key.strip().partition(".")
    if not sep or not dot or not method or not name:
        raise ValueError(f"--set {text!r}: write METHOD.OPTION=VALUE, e.g. --set tent.lr=5e-4")
    if method not in tta.methods():
        raise ValueError(f"--set {text}: unknown method {method!r}; registered methods: {', '.join(tta.methods())}")
    fields = {f.name: hint for f, hint in cli_fields(method, deprecated=True)}
    if name not in fields:
        listed = [f.name for f, _ in cli_fields(method)]
        raise ValueError(f"--set {text}: method {method!r} has no option {name!r}; its options: "
                         f"{', '.join(listed)} (`tta methods {method}` lists them with their defaults)")
    return method, name, parse_value(method, name, fields[name], value.strip())


def add_method_options(parser: argparse.ArgumentParser, methods: list[str] | None = None) -> None:
    """``--set METHOD.OPTION=VALUE``, and the deprecated per-method flags (hidden from ``--help``)."""
    parser.add_argument("--set", dest=SET_DEST, action="append", default=[], metavar="METHOD.OPTION=VALUE",
                        help="set one option of one method, e.g. --set tent.lr=5e-4 (repeatable); "
                             "`tta methods NAME` lists a method's options and defaults")
    for method in methods or tta.methods():
        for f, hint in cli_fields(method, deprecated=True):
            kwargs: dict[str, Any] = {"dest": _dest(method, f.name), "default": None, "help": argparse.SUPPRESS}
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif get_origin(hint) is Literal:
                kwargs.update(choices=list(get_args(hint)), type=type(get_args(hint)[0]))
            else:
                kwargs.update(type=hint)
            parser.add_argument(_flag(method, f.name), **kwargs)


def method_options_from_args(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options given on the command line for ``method`` (only those given): ``--set`` values, then the
    deprecated flags (which warn). A malformed ``--set`` raises ValueError."""
    given = {}
    for f, _ in cli_fields(method, deprecated=True):
        value = getattr(args, _dest(method, f.name), None)
        if value is not None:
            shown = str(value).lower() if isinstance(value, bool) else value
            warnings.warn(f"{_flag(method, f.name)} is deprecated and will be removed in 0.3; use "
                          f"--set {method}.{f.name}={shown}", FutureWarning, stacklevel=2)
            given[f.name] = value
    for text in getattr(args, SET_DEST, None) or []:
        setting_method, name, value = parse_setting(text)
        if setting_method == method:
            given[name] = value
    return given


def check_settings(args: argparse.Namespace, methods: list[str]) -> None:
    """Refuse ``--set`` for a method that the run does not include (a typo would otherwise be ignored)."""
    for text in getattr(args, SET_DEST, None) or []:
        method, _, _ = parse_setting(text)
        if method not in methods:
            raise ValueError(f"--set {text}: method {method!r} is not in this run's methods ({', '.join(methods)})")


def resolved_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``method`` with its value (given or default), JSON-friendly, for results and config
    (deprecated options, which never change results, are left out)."""
    options = tta.method_options(method)(**given)
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if f.metadata.get("cli", True) is True}
