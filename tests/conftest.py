"""Shared test fixtures: the location of the real data in ../shared/data, skipping cleanly when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TTA_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a message saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set TTA_SHARED_DATA or place ../shared/data beside the repo)")
    return path


@pytest.fixture(autouse=True)
def plain_path_after_each_test():
    """A test that turns the CPU fast path on (tta.accel, e.g. through a tta command) turns it off afterwards, so the
    next test starts on the plain path."""
    yield
    from tta import accel

    if any(accel.state()[piece] for piece in accel.PIECES):
        accel.disable()


@pytest.fixture(autouse=True)
def registry_as_before_each_test():
    """Methods a test registers (a plugin imported by ``main([... "--plugin", M])``, say) are gone after it, with
    their modules, so tests that enumerate ``tta.methods()`` see the built-in methods only."""
    import sys

    from tta import registry

    before = dict(registry._METHODS)
    yield
    for name, cls in list(registry._METHODS.items()):
        if name not in before:
            sys.modules.pop(cls.__module__, None)
    registry._METHODS.clear()
    registry._METHODS.update(before)


@pytest.fixture
def one_thread():
    """Training on a shared 2-core machine: one intra-op thread avoids spin-waiting between busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cifar10_zip() -> Path:
    return shared_path("cifar10", "cifar10-jpeg.zip")


@pytest.fixture(scope="session")
def resnet20_weights() -> Path:
    return shared_path("models", "akamaster-resnet-cifar10", "resnet20-12fca82f.th")


@pytest.fixture(scope="session")
def frost_dir() -> Path:
    return shared_path("frost")
