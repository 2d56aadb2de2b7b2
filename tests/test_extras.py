"""Optional dependencies: a missing one gives a one-line error naming the extra of tta-runtime that installs it.

A missing package is simulated in a fresh interpreter with ``sys.modules[name] = None`` (what Python itself treats
as "not importable"), so the real environment may have every extra installed.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tta._extras import EXTRAS, MissingExtraError, install_hint, require

REPO = Path(__file__).resolve().parents[1]


def _without(module: str, code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which ``module`` cannot be imported."""
    prelude = f"import sys\nsys.modules[{module!r}] = None\n"
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=300)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_extras_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (distribution, extra) in EXTRAS.items():
        names = [re.match(r"[A-Za-z0-9._-]+", requirement).group() for requirement in extras[extra]]
        assert distribution in names, f"{module}: extra [{extra}] of pyproject.toml does not install {distribution}"
    (everything,) = extras["all"]
    assert set(re.fullmatch(r"tta-runtime\[(.*)\]", everything).group(1).split(",")) == {e for _, e in EXTRAS.values()}
    assert "tta-runtime[all]" in extras["test"]


def test_require_names_the_extra_only_for_the_missing_package() -> None:
    result = _without("sklearn", "from tta._extras import require, MissingExtraError\n"
                                 "try:\n    require('sklearn.datasets', 'the digits dataset')\n"
                                 "except MissingExtraError as error:\n    print(error)\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("the digits dataset needs scikit-learn, which is not installed: "
                                     "pip install 'tta-runtime[digits]'")
    # an installed package whose own dependency is missing keeps its own error
    result = _without("sklearn.utils", "from tta._extras import require\nrequire('sklearn.datasets', 'x')\n")
    assert result.returncode == 1 and "MissingExtraError" not in result.stderr
    assert _last_line(result).startswith("ModuleNotFoundError")
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("numpy", "arrays")
    assert issubclass(MissingExtraError, ImportError)


@pytest.mark.parametrize("module, code, needed_for", [
    ("avalanche", "import continual", "the continual package (tta continual)"),
    ("sklearn", "import streams\nstreams.load_digits()", "the digits dataset"),
    ("robustbench", "from eval.models import model_entry\nmodel_entry('robustbench:Standard')", "robustbench models"),
    ("matplotlib", "from eval.report import pyplot\npyplot()", "plots"),
])
def test_missing_extra_in_python(module: str, code: str, needed_for: str) -> None:
    result = _without(module, code)
    assert result.returncode == 1
    distribution = EXTRAS[module][0]
    assert _last_line(result) == (f"tta._extras.MissingExtraError: {needed_for} needs {distribution}, which is not "
                                  f"installed: {install_hint(module)}")


@pytest.mark.parametrize("module, argv, extra", [
    ("avalanche", ["continual", "--help"], "continual"),
    ("avalanche", ["continual", "--out", "unused"], "continual"),
    ("sklearn", ["demo", "--out", "unused"], "digits"),
])
def test_missing_extra_on_the_command_line(module: str, argv: list[str], extra: str, tmp_path: Path) -> None:
    argv = [a if a != "unused" else str(tmp_path / "out") for a in argv]
    result = _without(module, f"from eval.cli import main\nsys.exit(main({argv!r}))")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tta {argv[0]}: error: "), result.stderr
    assert lines[0].endswith(f"pip install 'tta-runtime[{extra}]'")


def test_report_without_matplotlib_skips_the_plots_only(tmp_path: Path) -> None:
    code = ("from eval.report import write_report\n"
            "records = [{'method': 'source', 'protocol': 'p', 'domain': 'a', 'segment': 0, 'error': 0.5,\n"
            "            'n': 10, 'online_error': [0.5]}]\n"
            f"write_report(records, {str(tmp_path)!r})\n")
    result = _without("matplotlib", code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("plots skipped: plotting needs matplotlib, which is not installed: "
                                     "pip install 'tta-runtime[plots]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md", "results_p.csv"]


def test_frost_without_its_extra_names_it() -> None:
    code = "from streams.corruption_photos import find_frost_dir\nfind_frost_dir()"
    result = _without("imagecorruptions", code, env={"TTA_FROST_DIR": ""})
    assert result.returncode == 1
    assert _last_line(result).startswith("FileNotFoundError: the frost corruption needs the frost photographs")
    assert "pip install 'tta-runtime[frost]'" in _last_line(result)


def test_corruption_command_without_frost_photographs_fails_before_running(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["corruption", "--data", "digits", "--corruptions", "gaussian_noise,frost", "--methods", "source",
            "--n-images", "16", "--no-progress", "--out", str(out)]
    result = _without("imagecorruptions", f"from eval.cli import main\nsys.exit(main({argv!r}))",
                      env={"TTA_FROST_DIR": ""})
    assert result.returncode == 2, result.stderr
    assert _last_line(result).startswith("tta corruption: error: the frost corruption needs the frost photographs")
    assert not (out / "results.jsonl").exists()


def test_frost_with_its_extra_finds_the_photographs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pip user who installed tta-runtime[frost] (imagecorruptions) gets the photographs with no setting."""
    if importlib.util.find_spec("imagecorruptions") is None:
        pytest.skip("the frost extra (imagecorruptions) is not installed")
    from streams.corruption_photos import FROST_ENV, FROST_FILES, FROST_USED, find_frost_dir

    monkeypatch.delenv(FROST_ENV, raising=False)
    folder = find_frost_dir()
    assert folder.parent.name == "imagecorruptions"
    assert all((folder / name).is_file() for name in FROST_FILES[:FROST_USED])
