"""Errors whose advice names arguments, worded for the caller: Python keyword arguments or ``tta`` flags.

The same fact ("pass the checkpoint") is spelled ``weights=PATH`` to a Python caller and ``--weights PATH`` on the
command line. An :class:`AdviceError` keeps its message as a template with ``{weights}``-style placeholders:
``str(error)`` fills them with the Python spelling, :attr:`AdviceError.cli_message` with the flag, and the ``tta``
command prints the latter.
"""
from __future__ import annotations

from typing import Any

# placeholder -> (Python spelling, command-line spelling)
ARGUMENTS: dict[str, tuple[str, str]] = {
    "weights": ("weights=PATH", "--weights PATH"),
    "download": ("download=True", "--download"),
    "random_weights": ("random_weights=True", "--random-weights"),
    "num_classes": ("num_classes=N", "--num-classes N"),
    "class_map": ("class_map=[...]", "--class-map"),
}


class AdviceError(Exception):
    """Base of the errors below: ``template`` names arguments as ``{weights}``, ``{download}``, ... (see
    :data:`ARGUMENTS`); other placeholders are filled from ``values``."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self._format(0))

    def _format(self, spelling: int) -> str:
        names = {name: forms[spelling] for name, forms in ARGUMENTS.items()}
        return self.template.format(**names, **self.values)

    @property
    def cli_message(self) -> str:
        """The message with command-line flags (``--weights PATH``) instead of keyword arguments."""
        return self._format(1)


class UsageError(AdviceError, ValueError):
    """A bad or incomplete combination of arguments."""


class MissingFileError(AdviceError, FileNotFoundError):
    """A file the run needs is not where it is looked for."""


class DownloadError(AdviceError, ConnectionError):
    """A download failed (no network, or the server refused): says what, from where, and how to supply it."""
