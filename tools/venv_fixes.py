"""Fixes for a virtual environment whose registry builds do not fit together; the Makefile runs this after installing.

Two known problems of the pinned install (constraints.txt):

``torchvision-schemas``
    The registry's torchvision 0.28.0 is a CUDA build. Next to the CPU build of torch its compiled ops
    (``torchvision/_C.so``) fail to load, and ``import torchvision`` dies with "operator torchvision::nms does not
    exist": ``torchvision._meta_registrations`` registers fake kernels for ``nms`` and ``qnms`` whether or not the
    ops loaded. The fix defines the two operator schemas (no kernels) with ``torch.library`` just before that
    module runs, and only when torchvision's extension did not load. torchvision's Python parts (models,
    transforms, datasets) then work; calling ``nms`` still fails, which is honest: that build has no CPU kernel.
``autoattack-alias``
    robustbench 1.1.1 does ``import autoattack``, but its dependency pyautoattack installs the package as
    ``pyautoattack``. The fix resolves ``autoattack`` and ``autoattack.X`` to ``pyautoattack`` and
    ``pyautoattack.X``.

``python tools/venv_fixes.py`` (with the environment's interpreter) removes any hook it installed before, imports
torchvision and then robustbench (when installed) each in a fresh interpreter, and installs a startup hook only for
a failure with exactly the error a fix is for: ``tta_venv_fixes.pth`` plus this file as ``_tta_venv_fixes.py`` in
site-packages. On a healthy install it installs nothing. It then checks both imports again in fresh interpreters
and exits 1 if either still fails. ``--remove`` only removes the hook.

At interpreter start the hook costs one small module import (``sys`` only); its finders act only when torchvision
or autoattack is imported.
"""
from __future__ import annotations

import sys

HOOK_MODULE = "_tta_venv_fixes"
HOOK_PTH = "tta_venv_fixes.pth"
TORCHVISION_ERROR = "operator torchvision::nms does not exist"
AUTOATTACK_ERROR = "No module named 'autoattack'"
# Schemas of the operators torchvision registers fake kernels for at import (from torchvision/csrc/ops).
TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

# ---------------------------------------------------------------------------------------------------------------
# The startup hook (what runs in every interpreter of the environment once installed): standard library only.


class TorchvisionSchemas:
    """Meta-path finder: when ``torchvision._meta_registrations`` is about to load and torchvision's compiled
    extension did not load, defines the operator schemas it registers fake kernels for. Finds nothing itself."""

    library = None  # the torch.library.Library holding the definitions (they live as long as it does)

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 (meta-path finder protocol)
        if fullname == "torchvision._meta_registrations" and TorchvisionSchemas.library is None:
            extension = sys.modules.get("torchvision.extension")
            if extension is not None and not extension._has_ops():
                import torch

                library = torch.library.Library("torchvision", "FRAGMENT")
                for schema in TORCHVISION_SCHEMAS:
                    library.define(schema)
                TorchvisionSchemas.library = library
        return None


class ModuleAlias:
    """Meta-path finder: resolves ``alias`` and ``alias.X`` to the already importable ``target`` and ``target.X``
    (the same module objects, under both names)."""

    def __init__(self, alias: str, target: str) -> None:
        self.alias, self.target = alias, target

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 (meta-path finder protocol)
        if fullname != self.alias and not fullname.startswith(self.alias + "."):
            return None
        import importlib.util

        real_name = self.target + fullname[len(self.alias):]
        if importlib.util.find_spec(real_name) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(real_name))


class _AliasLoader:
    def __init__(self, real_name: str) -> None:
        self.real_name = real_name

    def create_module(self, spec):  # the real module stands in for the alias
        import importlib

        return importlib.import_module(self.real_name)

    def exec_module(self, module) -> None:  # already executed under its real name
        return None


def install(*fixes: str) -> None:
    """Put the finders of ``fixes`` on ``sys.meta_path`` (called by the ``.pth`` line at interpreter start)."""
    unknown = set(fixes) - {"torchvision-schemas", "autoattack-alias"}
    if unknown:
        raise ValueError(f"unknown venv fixes {sorted(unknown)}")
    if any(isinstance(finder, (TorchvisionSchemas, ModuleAlias)) for finder in sys.meta_path):
        return  # site-packages reached twice (a venv's lib64 -> lib link): once is enough
    if "torchvision-schemas" in fixes:
        sys.meta_path.insert(0, TorchvisionSchemas())  # must see the import before the path finder loads it
    if "autoattack-alias" in fixes:
        sys.meta_path.append(ModuleAlias("autoattack", "pyautoattack"))  # only when nothing else finds it


# ---------------------------------------------------------------------------------------------------------------
# The installer (python tools/venv_fixes.py).


def _site_packages():
    import sysconfig
    from pathlib import Path

    return Path(sysconfig.get_path("purelib"))


def remove_hook() -> bool:
    """Remove the hook files from site-packages; True when there were any."""
    import importlib.util
    from pathlib import Path

    site = _site_packages()
    module = site / (HOOK_MODULE + ".py")
    found = False
    for path in (site / HOOK_PTH, module, Path(importlib.util.cache_from_source(str(module)))):
        if path.exists():
            path.unlink()
            found = True
    return found


def write_hook(fixes: list[str]) -> None:
    """Install the hook enabling ``fixes`` (this file as the hook module, and the ``.pth`` line calling it)."""
    import py_compile
    import shutil
    from pathlib import Path

    site = _site_packages()
    module = site / (HOOK_MODULE + ".py")
    shutil.copyfile(Path(__file__).resolve(), module)
    py_compile.compile(str(module), doraise=True)  # every interpreter start loads it: compiled once, here
    arguments = ", ".join(repr(fix) for fix in fixes)
    # site.py executes a .pth line that starts with "import"; tools/venv_fixes.py wrote it.
    (site / HOOK_PTH).write_text(f"import {HOOK_MODULE}; {HOOK_MODULE}.install({arguments})\n")


def fresh_import(statement: str) -> subprocess.CompletedProcess[str]:
    """Run ``statement`` in a fresh interpreter of this environment; the completed process."""
    import subprocess

    return subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True)


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# (statement, the error a fix is for, the fix, whether it applies here), in order: robustbench imports torchvision.
CHECKS = (
    ("import torchvision", TORCHVISION_ERROR, "torchvision-schemas", lambda: True),
    ("import robustbench", AUTOATTACK_ERROR, "autoattack-alias", lambda: _installed("pyautoattack")),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if sys.prefix == sys.base_prefix:
        print("venv_fixes: refusing to change an interpreter that is not a virtual environment "
              f"({sys.executable}); run it with the environment's python", file=sys.stderr)
        return 2
    if argv not in ([], ["--remove"]):
        print("usage: python tools/venv_fixes.py [--remove]", file=sys.stderr)
        return 2
    remove_hook()
    if argv == ["--remove"]:
        print(f"venv_fixes: hook removed from {_site_packages()}")
        return 0
    fixes: list[str] = []
    for statement, error, fix, applies in CHECKS:
        if not _installed(statement.split()[-1]):
            continue
        result = fresh_import(statement)
        if result.returncode != 0 and error in result.stderr and applies():
            fixes.append(fix)
            write_hook(fixes)
            result = fresh_import(statement)
        if result.returncode != 0:
            print(f"venv_fixes: `{statement}` fails in {sys.prefix} and no fix here is for that error:\n"
                  + result.stderr.strip()[-2000:], file=sys.stderr)
            return 1
    checked = [statement for statement, *_ in CHECKS if _installed(statement.split()[-1])]
    print(f"venv_fixes: in a fresh interpreter {' and '.join(f'`{s}`' for s in checked)} "
          + ("work; " if len(checked) > 1 else "works; ")
          + (f"hook installed ({', '.join(fixes)}): {_site_packages() / HOOK_PTH}" if fixes else "no fix needed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
