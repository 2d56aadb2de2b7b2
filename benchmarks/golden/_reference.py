"""Import a method of the reference checkout (mariodoebler/test-time-adaptation) without its heavy imports.

``methods/base.py`` imports ``models.model`` (open_clip, robustbench, datasets) for one isinstance check; this
installs a stand-in ``models.model`` with an empty ``ResNetDomainNet126`` and a ``methods`` package whose
``__init__`` (which imports every method) is not run. The configuration is a plain namespace holding the
reference's defaults (``classification/conf.py``) that the methods read; pass overrides per section.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from types import SimpleNamespace

# The defaults of classification/conf.py that TTAMethod, SAR and DeYO read.
DEFAULTS = {
    "MODEL": {"EPISODIC": False, "RESET_AFTER_NUM_UPDATES": 0, "ARCH": "Standard"},
    "CORRUPTION": {"DATASET": "cifar10_c"},
    "OPTIM": {"STEPS": 1, "LR": 1e-3, "METHOD": "Adam", "BETA": 0.9, "MOMENTUM": 0.9, "DAMPENING": 0.0,
              "NESTEROV": True, "WD": 0.0},
    "TEST": {"WINDOW_LENGTH": 1},
    "EATA": {"MARGIN_E0": 0.4},
    "SAR": {"RESET_CONSTANT_EM": 0.2},
    "DEYO": {"REWEIGHT_ENT": True, "REWEIGHT_PLPD": True, "PLPD": 0.2, "MARGIN": 0.5, "AUG_TYPE": "patch",
             "OCCLUSION_SIZE": 112, "ROW_START": 56, "COLUMN_START": 56, "PATCH_LEN": 4},
}


def reference_method(checkout: str | Path, module: str) -> types.ModuleType:
    """``methods.<module>`` of the checkout (the folder holding ``classification/``)."""
    root = Path(checkout) / "classification"
    if not (root / "methods" / f"{module}.py").exists():
        raise SystemExit(f"{root / 'methods' / (module + '.py')} not found: pass the reference checkout's root")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if "models.model" not in sys.modules:
        models = types.ModuleType("models")
        models.__path__ = []
        model = types.ModuleType("models.model")
        model.ResNetDomainNet126 = type("ResNetDomainNet126", (), {})
        sys.modules.setdefault("models", models)
        sys.modules.setdefault("models.model", model)
    if "methods" not in sys.modules:
        methods = types.ModuleType("methods")
        methods.__path__ = [str(root / "methods")]
        sys.modules["methods"] = methods
    return importlib.import_module(f"methods.{module}")


def config(**sections: dict) -> SimpleNamespace:
    """The reference's configuration: DEFAULTS with ``sections`` (e.g. ``SAR={"RESET_CONSTANT_EM": 1.0}``)."""
    merged = {name: {**values, **sections.get(name, {})} for name, values in DEFAULTS.items()}
    return SimpleNamespace(MIXED_PRECISION=False, **{name: SimpleNamespace(**v) for name, v in merged.items()})
