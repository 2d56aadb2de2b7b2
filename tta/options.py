"""Typed options: every method's options are a dataclass; defaults and their reasons live in the fields.

``option(default, help)`` attaches the help text that the CLI shows (the CLI is generated from these dataclasses).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and a help text (read by the CLI generator)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class MethodOptions:
    """Options every method takes."""

    episodic: bool = option(False, "reset to the source model before every batch")
    check_inputs: bool = option(
        True, "validate every batch (shape, dtype, finite values) before it touches the model; on a GPU the "
              "finite check costs one host-device synchronisation per batch")


@dataclass
class GradientOptions(MethodOptions):
    """Options of methods that take gradient steps on the normalisation layers' affine parameters.

    Defaults are tent's CIFAR setting (Wang et al. 2021: Adam, lr 1e-3, beta1 0.9, batch 200); for ImageNet tent
    uses SGD, lr 2.5e-4, momentum 0.9, batch 64.
    """

    optimizer: Literal["adam", "sgd"] = option("adam", "optimizer for the affine parameters: adam or sgd")
    lr: float = option(1e-3, "learning rate (tent, CIFAR: 1e-3 with Adam; ImageNet: 2.5e-4 with SGD)")
    steps: int = option(1, "gradient updates per batch")
    beta1: float = option(0.9, "Adam's beta1 (tent: 0.9)")
    momentum: float = option(0.9, "SGD momentum (tent, ImageNet: 0.9)")
    nesterov: bool = option(True, "Nesterov momentum for SGD (tent's configuration: True)")
    weight_decay: float = option(0.0, "weight decay (tent: 0)")
    lean_graph: Literal["auto", "on", "off"] | None = option(
        None, "deprecated (removed in 0.3; warns): use tta.accel.enable(lean_graph=...). 'on'/'off' force the lean "
              "graph of tta.accel.lean_graph on/off for this adapter; None or 'auto' follow tta.accel",
        cli="deprecated")


def options_from_kwargs(options_cls: type, method: str, kwargs: dict[str, Any]) -> Any:
    """Build an options dataclass from keyword arguments; an unknown name is a clear TypeError."""
    names = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"method {method!r} has no option(s) {', '.join(unknown)}; its options are: "
                        f"{', '.join(sorted(names))}")
    return options_cls(**kwargs)
