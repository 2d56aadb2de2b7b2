"""Command-line options generated from the methods' option dataclasses (never copied by hand).

Every field of every registered method becomes ``--<method>-<field>`` (e.g. ``--tent-lr 5e-4``,
``--alpha_bn-alpha 0.2``), with the field's help text and default. Fields marked ``cli=False`` (objects such as
cafa's source statistics) are supplied by the runner instead. Fields marked ``cli="deprecated"`` keep their flag for
one minor version, with a help text saying what replaces them (the adapter warns when the option is used).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import tta


def _flag(method: str, name: str) -> str:
    return f"--{method}-{name.replace('_', '-')}"


def _dest(method: str, name: str) -> str:
    return f"opt__{method}__{name}"


def _cli_fields(method: str, deprecated: bool = False) -> list[tuple[dataclasses.Field, Any]]:
    """The fields with a flag (with ``deprecated``: those kept for one version too) and their types, ``X | None``
    read as ``X``."""
    cls = tta.method_options(method)
    hints = typing.get_type_hints(cls)
    shown = (True, "deprecated") if deprecated else (True,)
    return [(f, _without_none(hints[f.name])) for f in dataclasses.fields(cls) if f.metadata.get("cli", True) in shown]


def _without_none(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        rest = [arg for arg in get_args(hint) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def add_method_options(parser: argparse.ArgumentParser, methods: list[str] | None = None) -> None:
    """One argument group per method with a flag per option (default None = the dataclass default)."""
    for method in methods or tta.methods():
        group = parser.add_argument_group(f"{method} options")
        for f, hint in _cli_fields(method, deprecated=True):
            help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
            kwargs: dict[str, Any] = {"dest": _dest(method, f.name), "default": None, "help": help_text}
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif get_origin(hint) is Literal:
                kwargs.update(choices=list(get_args(hint)), type=type(get_args(hint)[0]))
            elif hint in (int, float, str):
                kwargs.update(type=hint, metavar=f.name.upper())
            else:
                continue
            group.add_argument(_flag(method, f.name), **kwargs)


def method_options_from_args(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options given on the command line for ``method`` (only those given)."""
    given = {}
    for f, _ in _cli_fields(method, deprecated=True):
        value = getattr(args, _dest(method, f.name), None)
        if value is not None:
            given[f.name] = value
    return given


def resolved_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``method`` with its value (given or default), JSON-friendly, for results and config."""
    options = tta.method_options(method)(**given)
    return {f.name: getattr(options, f.name) for f, _ in _cli_fields(method)}
