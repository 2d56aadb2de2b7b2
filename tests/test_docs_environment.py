"""What a new user must be able to find: every TTA_* environment variable the code reads is documented (README,
docs/ or ``tta --help``), and ``--model``'s help names every kind of model it accepts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from eval.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
READ = re.compile(r"environ(?:\.get)?[(\[]\s*[\"'](TTA_[A-Z0-9_]+)")


def variables_read() -> set[str]:
    """TTA_* names read through os.environ in the library's packages (scanned when the test runs)."""
    names: set[str] = set()
    for package in ("tta", "streams", "eval", "continual"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(READ.findall(path.read_text(encoding="utf-8")))
    return names


def test_every_environment_variable_is_documented() -> None:
    names = variables_read()
    assert "TTA_SHARED_DATA" in names  # the scan finds what it should
    text = "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    text += build_parser().format_help()
    assert sorted(n for n in names if n not in text) == []


def test_model_help_names_every_kind_of_model(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["corruption", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    start = help_text.rindex("--model MODEL")  # its description, after the usage line
    model = help_text[start:help_text.index("--weights WEIGHTS", start)]
    for kind in ("cifar10_resnet20", "torchvision:<arch>", "robustbench:[<dataset>/]<name>"):
        assert kind in model
