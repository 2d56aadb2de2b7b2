"""Every fenced ```python block of README.md and docs/*.md runs as written.

The files are read when the tests are collected, so a rewritten README is tested as it stands. Names a block uses
without defining (``model``, ``x``, ...) are defined per file in :data:`PLACEHOLDERS`, small. A block that needs
CUDA, a network or a long run is marked in the Markdown, on the line just above its fence, with
``<!-- skip-test: reason -->``; the reason is shown as the skip message. Shell blocks are not run here.
"""
from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*```\s*python\s*$")
END = re.compile(r"^\s*```\s*$")
SKIP = re.compile(r"^\s*<!--\s*skip-test:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason given in a skip-test comment


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, with a skip reason when the line above the fence gives one."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.match(above)
            i += 1
            while i < len(lines) and not END.match(lines[i]):
                i += 1
            if i == len(lines):
                raise ValueError(f"{path}:{start + 1}: a ```python block is never closed")
            name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
            blocks.append(Block(name, start + 1, "\n".join(lines[start + 1:i]), skip.group(1) if skip else None))
        i += 1
    return blocks


# -- placeholders: per file, the names its blocks use without defining them ---------------------------------------
def _adapting(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A small BatchNorm CNN, a batch of images in [0, 1], and labelled batches covering every class."""
    from eval.demo import digits_cnn

    torch.manual_seed(0)
    model = digits_cnn(num_classes=4).eval()
    x = torch.rand(8, 3, 16, 16)
    labels = torch.arange(16) % 4
    return {"model": model, "x": x, "labelled_batches": [(torch.rand(16, 3, 16, 16), labels)]}


def _corruptions(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """CIFAR-sized images; frost's photographs from the shared data (or an installed imagecorruptions)."""
    frost = SHARED_DATA / "frost"
    if frost.is_dir():
        monkeypatch.setenv("TTA_FROST_DIR", str(frost))
    else:
        pytest.importorskip("imagecorruptions", reason=f"frost photographs: neither {frost} nor imagecorruptions")
    torch.manual_seed(0)
    return {"x": torch.rand(2, 3, 32, 32)}


PLACEHOLDERS: dict[str, Callable[[pytest.MonkeyPatch], dict[str, Any]]] = {
    "README.md": _adapting,
    "docs/corruptions.md": _corruptions,
}


def _all_blocks() -> list[Any]:
    params = []
    for path in markdown_files():
        for block in python_blocks(path):
            marks = [pytest.mark.skip(reason=block.skip)] if block.skip else []
            params.append(pytest.param(block, id=f"{block.file}:{block.line}", marks=marks))
    return params


def test_markdown_files_hold_python_blocks() -> None:
    assert any(python_blocks(path) for path in markdown_files()), "no ```python block found: is the parser broken?"


@pytest.mark.parametrize("block", _all_blocks())
def test_python_block_runs_as_written(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      one_thread: None) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (stats.save("stats.pt"))
    module = types.ModuleType(f"block_{block.line}")  # a real module: dataclasses and pickling look it up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__
    namespace.update(PLACEHOLDERS.get(block.file, lambda mp: {})(monkeypatch))
    code = compile(block.code, f"{block.file}:{block.line}", "exec")
    exec(code, namespace)


def test_parser_reads_fences_and_skip_comments(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n<!-- skip-test: needs CUDA -->\n\n```python\nb = 2\n```\n"
                    "```bash\nls\n```\n")
    assert [(b.code, b.skip, b.line) for b in python_blocks(page)] == [("a = 1", None, 3), ("b = 2", "needs CUDA", 9)]
