"""source: the unchanged model in eval mode, the reference row of every table."""
from __future__ import annotations

from dataclasses import dataclass

from tta.base import Adapted
from tta.options import MethodOptions
from tta.registry import register


@dataclass
class SourceOptions(MethodOptions):
    """The source model takes no options beyond the common ones."""


@register("source")
class Source(Adapted):
    """Predicts with the model as given (eval mode, no graph); never changes it. Works with any model."""

    Options = SourceOptions
