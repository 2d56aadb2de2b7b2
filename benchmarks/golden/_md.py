"""Import methods from a checkout of mariodoebler/test-time-adaptation (MD) without its dataset and model zoo.

``load(checkout, "methods.roid")`` puts MD's ``classification`` folder's packages (methods, utils, augmentations)
on the import path as namespace packages, so their ``__init__`` files (which import every method and its
dependencies) never run; ``models.model`` is a stub with the one name MD's methods import from it. MD picks CUDA
when it is available: the golden outputs are made on the CPU, so CUDA is hidden from it.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch


def classification_dir(checkout: str | Path) -> Path:
    root = Path(checkout)
    for candidate in (root / "classification", root):
        if (candidate / "methods" / "base.py").is_file():
            return candidate
    raise SystemExit(f"{checkout}: not an MD checkout (no classification/methods/base.py)")


def load(checkout: str | Path, module: str) -> types.ModuleType:
    root = classification_dir(checkout)
    torch.cuda.is_available = lambda: False  # MD's methods choose "cuda" when available; these goldens are CPU
    for package in ("methods", "utils", "augmentations"):
        stub = types.ModuleType(package)
        stub.__path__ = [str(root / package)]
        sys.modules[package] = stub
    models = types.ModuleType("models")
    models.__path__ = []
    model = types.ModuleType("models.model")
    model.ResNetDomainNet126 = type("ResNetDomainNet126", (torch.nn.Module,), {})
    sys.modules["models"], sys.modules["models.model"] = models, model
    return importlib.import_module(module)


def config(**sections: dict) -> SimpleNamespace:
    """An MD cfg with the fields TTAMethod reads (conf.py's defaults), overridden by ``sections``."""
    base = {
        "MODEL": {"EPISODIC": False, "RESET_AFTER_NUM_UPDATES": 0},
        "CORRUPTION": {"DATASET": "cifar10_c"},
        "OPTIM": {"STEPS": 1, "LR": 1e-3, "METHOD": "Adam", "BETA": 0.9, "MOMENTUM": 0.9, "DAMPENING": 0.0,
                  "NESTEROV": True, "WD": 0.0},
        "TEST": {"WINDOW_LENGTH": 1, "BATCH_SIZE": 128, "N_AUGMENTATIONS": 32},
        "BN": {"ALPHA": 0.1},
        "MIXED_PRECISION": False,
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(name, {}).update(values)
        else:
            base[name] = values
    return SimpleNamespace(**{k: SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in base.items()})
