"""Import-time fixes for two packaging problems of the pinned environment; imported first by every package.

1. torchvision 0.28.0 from the registry is a CUDA build. Next to the CPU build of torch its compiled ops fail to
   load, and ``import torchvision`` then dies with "operator torchvision::nms does not exist" because
   ``torchvision._meta_registrations`` registers fake kernels for ``nms`` and ``qnms`` unconditionally. Only when
   that exact error occurs, we define the two operator schemas (no kernels) with ``torch.library`` and import
   again: torchvision's Python parts (models, transforms, datasets) then load; calling ``nms`` still fails, which
   is honest, since no CPU kernel exists for it.
2. robustbench 1.1.1 does ``import autoattack``, but its dependency installs itself as ``pyautoattack``. When
   ``autoattack`` is missing and ``pyautoattack`` is present, we alias the module (and its submodules).

Both fixes are no-ops on a healthy install.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_TORCHVISION_ERROR = "operator torchvision::nms does not exist"
# Schemas of the operators torchvision registers fake kernels for at import (from torchvision/csrc/ops).
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_torchvision_library = None  # keeps the torch.library.Library alive (the definitions die with it)


def _drop_modules(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def fix_torchvision() -> bool:
    """Make ``import torchvision`` work; returns True when the schema fix was needed."""
    global _torchvision_library
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
        return False
    except RuntimeError as error:
        if _TORCHVISION_ERROR not in str(error):
            raise
    import torch

    _drop_modules("torchvision")
    _torchvision_library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_SCHEMAS:
        _torchvision_library.define(schema)
    importlib.import_module("torchvision")
    return True


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves ``autoattack`` and ``autoattack.X`` to ``pyautoattack`` and ``pyautoattack.X``, lazily."""

    def __init__(self, alias: str, target: str) -> None:
        self.alias, self.target = alias, target

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 (MetaPathFinder API)
        if fullname != self.alias and not fullname.startswith(self.alias + "."):
            return None
        real_name = self.target + fullname[len(self.alias):]
        if importlib.util.find_spec(real_name) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real_name))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, real_name: str) -> None:
        self.real_name = real_name

    def create_module(self, spec):  # the real module object stands in for the alias
        return importlib.import_module(self.real_name)

    def exec_module(self, module) -> None:  # already executed under its real name
        return None


def fix_autoattack() -> bool:
    """Alias ``pyautoattack`` as ``autoattack``; returns True when the alias was installed."""
    if importlib.util.find_spec("autoattack") is not None or importlib.util.find_spec("pyautoattack") is None:
        return False
    sys.meta_path.append(_AliasFinder("autoattack", "pyautoattack"))
    return True


TORCHVISION_PATCHED = fix_torchvision()
AUTOATTACK_ALIASED = fix_autoattack()
