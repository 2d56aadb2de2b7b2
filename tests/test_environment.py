"""The environment ``make`` builds: torchvision and robustbench import in any order, each in a fresh interpreter
of this environment; and the fixes of tools/venv_fixes.py act only where they are needed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIX = "run `make install` (or `python tools/venv_fixes.py` with this environment's python)"


def _fresh(code: str, pythonpath: str | os.PathLike = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def test_torchvision_first_then_torch_and_tta() -> None:
    result = _fresh("import torchvision, torch, tta\n"
                    "net = torchvision.models.resnet18(num_classes=3)\n"
                    "assert tta.adapt(net, 'norm')(torch.rand(2, 3, 32, 32)).shape == (2, 3)")
    assert result.returncode == 0, f"{FIX}:\n{result.stderr[-3000:]}"


def test_robustbench_alone() -> None:
    if importlib.util.find_spec("robustbench") is None:
        pytest.skip("robustbench is not installed (pip install 'tta-runtime[robustbench]')")
    result = _fresh("import robustbench, robustbench.utils")
    assert result.returncode == 0, f"{FIX}:\n{result.stderr[-3000:]}"


def test_module_alias_resolves_package_and_submodules(tmp_path: Path) -> None:
    (tmp_path / "target_pkg").mkdir()
    (tmp_path / "target_pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "target_pkg" / "sub.py").write_text("from . import VALUE\nDOUBLE = 2 * VALUE\n")
    code = ("import sys, venv_fixes\n"
            "sys.meta_path.append(venv_fixes.ModuleAlias('alias_pkg', 'target_pkg'))\n"
            "import alias_pkg.sub, target_pkg, target_pkg.sub\n"
            "from alias_pkg.sub import DOUBLE\n"
            "assert alias_pkg is target_pkg and alias_pkg.sub is target_pkg.sub and DOUBLE == 2\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('alias_pkg.missing') is None\n")
    result = _fresh(code, os.pathsep.join([str(tmp_path), str(REPO / "tools")]))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("has_ops", [True, False])
def test_torchvision_schemas_only_when_the_extension_did_not_load(has_ops: bool) -> None:
    """A stand-in ``torchvision.extension`` says whether the compiled ops loaded; the schemas are defined only
    when they did not."""
    code = ("import sys, types, torch, venv_fixes\n"
            f"sys.modules['torchvision.extension'] = types.SimpleNamespace(_has_ops=lambda: {has_ops})\n"
            "assert venv_fixes.TorchvisionSchemas().find_spec('torchvision._meta_registrations') is None\n"
            "library = venv_fixes.TorchvisionSchemas.library\n"
            "print('defined' if library is not None else 'untouched')\n"
            "if library is not None:\n"
            "    schema = str(torch.ops.torchvision.nms.default._schema)\n"
            "    assert schema.startswith('torchvision::nms(Tensor dets'), schema\n")
    result = _fresh(code, REPO / "tools")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["untouched" if has_ops else "defined"]


def test_install_adds_each_finder_once() -> None:
    code = ("import sys, venv_fixes\n"
            "ours = ('TorchvisionSchemas', 'ModuleAlias')  # those of a startup hook this environment may have\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ not in ours]\n"
            "venv_fixes.install('torchvision-schemas', 'autoattack-alias')\n"
            "venv_fixes.install('torchvision-schemas', 'autoattack-alias')\n"
            "kinds = [type(f).__name__ for f in sys.meta_path]\n"
            "assert kinds[0] == 'TorchvisionSchemas' and kinds.count('TorchvisionSchemas') == 1, kinds\n"
            "assert kinds[-1] == 'ModuleAlias' and kinds.count('ModuleAlias') == 1, kinds\n")
    result = _fresh(code, REPO / "tools")
    assert result.returncode == 0, result.stderr
