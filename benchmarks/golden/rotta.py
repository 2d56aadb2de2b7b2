"""Golden outputs of the reference RoTTA (MD, mariodoebler/test-time-adaptation at 8b2ed63) for tests/golden/rotta.json.

    python benchmarks/golden/rotta.py /path/to/test-time-adaptation   # a checkout (its classification/ folder)

Runs MD's ``classification/methods/rotta.py`` in float64 on the tiny ``tests.tta_nets.conv_net`` for a few batches
and writes its predictions, the final student and teacher parameters and the robust BatchNorm statistics. Its
strong augmentation (``self.transform``) is replaced by the deterministic ``FixedAugment`` of
benchmarks/golden/cotta.py, which tests/test_method_rotta.py injects into ours (the adapter's ``augment`` hook).
At 8b2ed63 the reference's update calls ``self.loss_calculation(x)``, which takes no argument (a TypeError outside
mixed precision): the script wraps it to drop the argument and changes nothing else.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cotta import ROOT, FixedAugment, load_reference, make_model, node  # noqa: E402

#: The scenarios: reference settings (ROTTA.*) and batches (count, size); our options use the same values.
SCENARIOS = {
    "small_memory": {"memory_size": 5, "update_frequency": 4, "nu": 0.001, "alpha": 0.05, "lambda_t": 1.0,
                     "lambda_u": 1.0, "batches": [6, 6, 6, 6]},
    "weights": {"memory_size": 6, "update_frequency": 3, "nu": 0.05, "alpha": 0.2, "lambda_t": 0.5,
                "lambda_u": 2.0, "batches": [5, 7, 4, 6]},
    "defaults": {"memory_size": 64, "update_frequency": 64, "nu": 0.001, "alpha": 0.05, "lambda_t": 1.0,
                 "lambda_u": 1.0, "batches": [40, 40, 50, 30]},
}


def make_rotta_model() -> torch.nn.Module:
    """conv_net with source statistics measured on a calibration batch of random images and its classifier centred
    and scaled on it, so that the source model predicts all four classes on random images with moderate logits
    (the plain one predicts one class for every image, which would leave the memory's class balancing untested)."""
    model = make_model()
    calibration = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    with torch.no_grad():
        for layer in (model[1], model[4]):
            layer.momentum = 1.0
        model.train()(calibration)
        model.eval()
        features = model[:-1](calibration)
        model[-1].weight.mul_(2.0 / features.std(0).mean())
        model[-1].bias.copy_(-model[-1].weight @ features.mean(0))
    return model


def make_batches(sizes: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64) for n in sizes]


def reference_cfg(scenario: dict) -> object:
    return node(MODEL=node(EPISODIC=False, RESET_AFTER_NUM_UPDATES=0), CORRUPTION=node(DATASET="cifar10_c"),
                OPTIM=node(STEPS=1, METHOD="Adam", LR=1e-3, BETA=0.9, WD=0.0),
                TEST=node(WINDOW_LENGTH=1, N_AUGMENTATIONS=32), MIXED_PRECISION=False,
                ROTTA=node(MEMORY_SIZE=scenario["memory_size"], UPDATE_FREQUENCY=scenario["update_frequency"],
                           NU=scenario["nu"], ALPHA=scenario["alpha"], LAMBDA_T=scenario["lambda_t"],
                           LAMBDA_U=scenario["lambda_u"]))


def _statistics(model: torch.nn.Module) -> dict[str, list]:
    return {name: [m.source_mean.tolist(), m.source_var.tolist()] for name, m in model.named_modules()
            if hasattr(m, "source_mean")}


def run_reference(scenario: dict) -> dict:
    rotta = importlib.import_module("methods.rotta")
    if not hasattr(rotta.RoTTA, "reference_loss_calculation"):  # the call passes x; the method takes none
        rotta.RoTTA.reference_loss_calculation = rotta.RoTTA.loss_calculation
        rotta.RoTTA.loss_calculation = lambda self, *unused: self.reference_loss_calculation()
    method = rotta.RoTTA(reference_cfg(scenario), make_rotta_model(), num_classes=4)
    method.transform = FixedAugment()
    outputs = [method(x).detach().tolist() for x in make_batches(scenario["batches"])]
    trained = {n for n, p in method.model.named_parameters() if p.requires_grad}
    return {"outputs": outputs, "updates": method.current_instance // scenario["update_frequency"],
            "memory_per_class": [len(items) for items in method.mem.data],
            "student": {n: p.detach().tolist() for n, p in method.model.named_parameters() if p.requires_grad},
            "teacher": {n: p.detach().tolist() for n, p in method.model_ema.named_parameters() if n in trained},
            "student_statistics": _statistics(method.model), "teacher_statistics": _statistics(method.model_ema)}


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    load_reference(Path(argv[0]))
    golden = {"reference": "mariodoebler/test-time-adaptation 8b2ed63 classification/methods/rotta.py",
              "scenarios": {name: {"options": scenario, **run_reference(scenario)}
                            for name, scenario in SCENARIOS.items()}}
    out = ROOT / "tests" / "golden" / "rotta.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(golden))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
