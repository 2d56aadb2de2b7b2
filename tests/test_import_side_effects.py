"""What using ``tta`` leaves behind in a fresh interpreter: nothing global.

Each action runs in its own fresh interpreter; every probe takes a snapshot before the action and reports
whether the action changed it. Add a probe (or an action) to extend the check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# name -> (snapshot taken before the action, expression that is True when the action changed it; `before` is the
# snapshot).
PROBES: dict[str, tuple[str, str]] = {
    "imported torchvision": ("None", "'torchvision' in sys.modules"),
    "changed sys.meta_path": ("list(sys.meta_path)", "sys.meta_path != before"),
}

# name -> code run after the snapshots (in a fresh interpreter with the repository on the path).
ACTIONS: dict[str, str] = {
    "import tta": "import tta",
}


def _changes(action: str) -> dict[str, bool]:
    lines = ["import json, sys", "snapshots = {}"]
    lines += [f"snapshots[{name!r}] = {before}" for name, (before, _) in PROBES.items()]
    lines.append(action)
    lines.append("changed = {}")
    for name, (_, check) in PROBES.items():
        lines += [f"before = snapshots[{name!r}]", f"changed[{name!r}] = bool({check})"]
    lines.append("print(json.dumps(changed))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("action", list(ACTIONS))
def test_action_changes_nothing_global(action: str) -> None:
    changed = _changes(ACTIONS[action])
    assert set(changed) == set(PROBES)
    assert not [name for name, value in changed.items() if value], f"`{action}` {changed}"


def test_probes_see_a_change() -> None:
    """The probes are not blind: importing torchvision and adding a finder are both seen."""
    changed = _changes("import torchvision\nclass Finder:\n    find_spec = staticmethod(lambda *a: None)\n"
                       "sys.meta_path.append(Finder())")
    assert changed == {"imported torchvision": True, "changed sys.meta_path": True}
