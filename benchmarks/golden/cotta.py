"""Golden outputs of the reference CoTTA (MD, mariodoebler/test-time-adaptation at 8b2ed63) for tests/golden/cotta.json.

    python benchmarks/golden/cotta.py /path/to/test-time-adaptation   # a checkout (its classification/ folder)

Runs MD's ``classification/methods/cotta.py`` in float64 on the tiny ``tests.tta_nets.conv_net`` for a few batches
and writes its predictions and final student/teacher parameters. The reference's random parts are made
deterministic on both sides: its augmentation (``self.transform``) is replaced by :func:`fixed_augment` (a
deterministic function of the batch and the call count), and its restore masks (``torch.rand(p.shape)`` from the
global generator) are reproduced by seeding the global generator before each batch with ``MASK_SEED + step``;
tests/test_method_cotta.py injects the same function and masks into ours through the adapter's ``augment`` and
``restore_mask`` hooks. Only the files the method imports are loaded (``methods/base.py``, ``methods/cotta.py``,
``utils``, ``augmentations``), with ``models.model`` stubbed (MD's model zoo needs packages irrelevant here).
"""
from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MASK_SEED = 1000
N_BATCHES = 3
#: The scenarios: reference settings (cfg) and our options (the same values).
SCENARIOS = {
    "augmented": {"ap": 0.92, "rst": 0.3, "n_augmentations": 3, "symmetric": False},  # the anchor is unsure: eq. 4
    "teacher": {"ap": 0.0, "rst": 0.3, "n_augmentations": 3, "symmetric": False},  # never augmented: eq. 1
    "symmetric": {"ap": 0.92, "rst": 0.0, "n_augmentations": 2, "symmetric": True},  # the ImageNet loss, no restore
}


def make_model() -> torch.nn.Module:
    sys.path.insert(0, str(ROOT))
    from tests.tta_nets import conv_net

    return conv_net(num_classes=4, seed=0).double()


def make_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(N_BATCHES)]


class FixedAugment:
    """A deterministic stand-in for the random augmentation: the k-th call flips (k odd), rolls by k pixels and
    rescales the intensities by 1 - 0.05 k, then clips to [0, 1]."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.calls
        self.calls += 1
        out = x.flip(-1) if k % 2 else x
        return (out.roll(k, dims=-2) * (1.0 - 0.05 * k)).clamp(0.0, 1.0)


class FixedMasks:
    """The reference's masks: ``torch.rand(p.shape) < p`` from a CPU generator seeded MASK_SEED + step, drawn in
    parameter order (ours: call ``start(step)`` before each batch; the reference seeds the global generator)."""

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self.generator = torch.Generator()

    def start(self, step: int) -> None:
        self.generator.manual_seed(MASK_SEED + step)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return torch.rand(p.shape, generator=self.generator) < self.probability


def load_reference(checkout: Path) -> None:
    """Put MD's ``classification`` folder on the path with stubs for what the methods import but never use."""
    folder = checkout / "classification"
    sys.path.insert(0, str(folder))
    for package in ("methods", "models"):  # no package __init__: it imports every method and model
        module = types.ModuleType(package)
        module.__path__ = [str(folder / package)]
        sys.modules[package] = module
    stub = types.ModuleType("models.model")
    stub.ResNetDomainNet126 = type("ResNetDomainNet126", (torch.nn.Module,), {})
    sys.modules["models.model"] = stub


def node(**values) -> types.SimpleNamespace:
    return types.SimpleNamespace(**values)


def reference_cfg(ap: float, rst: float, n_augmentations: int, symmetric: bool) -> types.SimpleNamespace:
    return node(MODEL=node(EPISODIC=False, RESET_AFTER_NUM_UPDATES=0),
                CORRUPTION=node(DATASET="imagenet_c" if symmetric else "cifar10_c"),
                OPTIM=node(STEPS=1, METHOD="Adam", LR=1e-3, BETA=0.9, WD=0.0),
                TEST=node(WINDOW_LENGTH=1, N_AUGMENTATIONS=n_augmentations), MIXED_PRECISION=False,
                M_TEACHER=node(MOMENTUM=0.999), COTTA=node(RST=rst, AP=ap))


def run_reference(scenario: dict) -> dict:
    cotta = importlib.import_module("methods.cotta")
    method = cotta.CoTTA(reference_cfg(**scenario), make_model(), num_classes=4)
    method.img_size = (8, 8)
    method.transform = FixedAugment()
    outputs = []
    for step, x in enumerate(make_batches()):
        torch.manual_seed(MASK_SEED + step)  # the restore masks: torch.rand(p.shape) in parameter order
        outputs.append(method(x).detach().tolist())
    return {"outputs": outputs,
            "student": {k: v.tolist() for k, v in method.model.state_dict().items() if v.is_floating_point()},
            "teacher": [p.detach().tolist() for p in method.model_ema.parameters()]}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    load_reference(Path(argv[0]))
    golden = {"reference": "mariodoebler/test-time-adaptation 8b2ed63 classification/methods/cotta.py",
              "scenarios": {name: {"options": scenario, **run_reference(scenario)}
                            for name, scenario in SCENARIOS.items()}}
    out = ROOT / "tests" / "golden" / "cotta.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(golden))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
