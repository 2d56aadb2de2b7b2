"""Library versions and machine facts written beside every result (config.json)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

from tta import accel


def versions() -> dict[str, Any]:
    found = {}
    for package in ("tta-runtime", "torch", "torchvision", "numpy", "avalanche-lib", "robustbench"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return {
        "versions": found,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # the pieces of the CPU fast path that are on (tta.accel.enable), and why one asked for is not
        "accel": accel.state(),
    }
