"""``tta methods``: the registered methods with what each updates and needs; ``tta methods NAME``: one method's
paper, options and defaults. Everything shown is read from the method classes and their option dataclasses."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing

import tta
from eval.method_cli import cli_fields, type_name
from tta.registry import method_class


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="a method: show its options, defaults and paper")


def per_batch(cls: type) -> str:
    """How a method runs on a batch, from its declarations: passes, episodes, inputs, features."""
    parts = ["several passes" if cls.multi_pass else "one pass"]
    if cls.episodic_by_design:
        parts.append("episodic")
    if cls.inputs != "any":
        parts.append(f"{cls.inputs} only")
    if cls.uses_classifier:
        parts.append("reads classifier features")
    return ", ".join(parts)


def methods_table() -> str:
    """One row per registered method, from its class declarations."""
    lines = ["| method | updates | batch statistics | layers | source data | per batch | what it does |",
             "|---|---|---|---|---|---|---|"]
    for name in tta.methods():
        cls = method_class(name)
        summary = (inspect.getdoc(cls) or "").split("\n")[0]
        lines.append(f"| {name} | {cls.updates} | {cls.batch_statistics} | {cls.layers} | "
                     f"{cls.source_data or '-'} | {per_batch(cls)} | {summary} |")
    return "\n".join(lines)


def method_page(name: str) -> str:
    """The method's module docstring (paper, equations, reference defaults), then its options."""
    cls = method_class(name)
    module = sys.modules[cls.__module__]
    lines = [f"# {name}", "", inspect.getdoc(module) or inspect.getdoc(cls) or "", "",
             f"updates: {cls.updates}; batch statistics: {cls.batch_statistics}; layers: {cls.layers}; "
             f"source data: {cls.source_data or 'none'}; per batch: {per_batch(cls)}", "",
             "| option | type | default | meaning |", "|---|---|---|---|"]
    settable = {f.name for f, _ in cli_fields(name)}
    hints = typing.get_type_hints(cls.Options)
    for f in dataclasses.fields(cls.Options):
        kind = type_name(hints[f.name]) if f.name in settable else "Python only"
        lines.append(f"| {f.name} | {kind} | {f.default!r} | {f.metadata.get('help', '')} |")
    lines += ["", f"Set one on the command line with --set {name}.OPTION=VALUE, in Python with "
                  f"tta.adapt(model, {name!r}, OPTION=VALUE)."]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(method_page(args.name) if args.name else methods_table())
    return 0
