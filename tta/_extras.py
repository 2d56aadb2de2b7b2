"""Optional dependencies: the extra of ``tta-runtime`` that installs each one, and a one-line error naming it.

The core install (torch, torchvision, numpy, tqdm, pillow) needs none of these; each is imported only where it is
used, through :func:`require`, so that a missing one says which extra to install. pyproject.toml lists the same
extras (a test checks that the two agree).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# import name -> (distribution, extra of tta-runtime that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "avalanche": ("avalanche-lib", "continual"),
    "robustbench": ("robustbench", "robustbench"),
    "matplotlib": ("matplotlib", "plots"),
    "sklearn": ("scikit-learn", "digits"),
    "imagecorruptions": ("imagecorruptions", "frost"),
    "ray": ("ray", "sweep"),
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message says which extra installs it."""


def install_hint(module: str) -> str:
    """The pip command that installs ``module``'s extra, e.g. ``pip install 'tta-runtime[continual]'``."""
    return f"pip install 'tta-runtime[{EXTRAS[_top(module)][1]}]'"


def missing_message(module: str, needed_for: str) -> str:
    distribution = EXTRAS[_top(module)][0]
    return f"{needed_for} needs {distribution}, which is not installed: {install_hint(module)}"


def installed(module: str) -> bool:
    """Whether the top-level package of ``module`` can be imported (found, not imported)."""
    return importlib.util.find_spec(_top(module)) is not None


def require_installed(module: str, needed_for: str) -> None:
    """Raise :class:`MissingExtraError` when ``module``'s package is absent; imports nothing."""
    if not installed(module):
        raise MissingExtraError(missing_message(module, needed_for))


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``); if its package is absent raise :class:`MissingExtraError`
    saying that ``needed_for`` (e.g. ``"the digits dataset"``) needs it and which extra installs it. A package
    that is installed but fails to import raises its own error."""
    require_installed(module, needed_for)
    return importlib.import_module(module)


def _top(module: str) -> str:
    top = module.partition(".")[0]
    if top not in EXTRAS:
        raise KeyError(f"{top!r} is not an optional dependency; known: {', '.join(EXTRAS)}")
    return top
