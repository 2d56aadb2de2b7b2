"""Golden outputs of the reference DeYO (mariodoebler/test-time-adaptation, classification/methods/deyo.py) on a
tiny float64 model, for tests/test_method_deyo.py.

    python benchmarks/golden/deyo.py /path/to/test-time-adaptation [tests/golden/deyo.json]

(The reference imports einops: install it where this script runs, e.g. ``pip install --target DIR einops`` and
PYTHONPATH=DIR.) The model is tests/tta_nets.conv_net(4, seed=0) with a spatial head (``model()``), in float64,
its classifier scaled by CLASSIFIER_SCALE (so that the selections keep some samples and drop others); batches
are torch.rand from a seeded generator. The reference draws its patch orders and pixel permutations from torch's global generator, seeded
with SEED just before the first batch; ours draw the same numbers from the adapter's generator (seed=SEED).
Each scenario records the logits the reference returns per batch and the BatchNorm affine parameters after the
last batch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reference import config, reference_method  # noqa: E402
from tests.tta_nets import conv_net  # noqa: E402

CLASSIFIER_SCALE = 16.0
INPUT_SEED = 11
SEED = 5
TRAINED = ["1.weight", "1.bias", "4.weight", "4.bias"]  # the two BatchNorm layers' affine parameters

# name: (our options, the reference's DEYO/OPTIM overrides, image side, batches)
SCENARIOS = {
    "patch": ({}, {}, 16, 3),
    # 18 is not a multiple of 4: resized to 16 and back
    "patch_resized": ({"plpd_threshold": 0.05}, {"DEYO": {"PLPD": 0.05}}, 18, 3),
    "pixel": ({"aug_type": "pixel"}, {"DEYO": {"AUG_TYPE": "pixel"}}, 16, 3),
    "occ": ({"aug_type": "occ", "occlusion_size": 10, "row_start": 3, "column_start": 4, "plpd_threshold": 0.05},
            {"DEYO": {"AUG_TYPE": "occ", "OCCLUSION_SIZE": 10, "ROW_START": 3, "COLUMN_START": 4, "PLPD": 0.05}},
            16, 3),
    "no_entropy_weight": ({"reweight_ent": False}, {"DEYO": {"REWEIGHT_ENT": False}}, 16, 2),
    "no_weights": ({"reweight_ent": False, "reweight_plpd": False},
                   {"DEYO": {"REWEIGHT_ENT": False, "REWEIGHT_PLPD": False}}, 16, 2),
    "plpd_0.1_lr_0.01_two_steps": ({"plpd_threshold": 0.1, "lr": 0.01, "steps": 2},
                                   {"DEYO": {"PLPD": 0.1}, "OPTIM": {"LR": 0.01, "STEPS": 2}}, 16, 2),
}


def model() -> torch.nn.Module:
    """conv_net with a 2 x 2 average pool and a Linear(32, 4) head (seed 1): its output depends on where things
    are in the image, so shuffling patches changes the prediction (after a global pool it would hardly)."""
    net = conv_net(4, seed=0)
    torch.manual_seed(1)
    net[6], net[8] = nn.AdaptiveAvgPool2d(2), nn.Linear(32, 4)
    net = net.double()
    with torch.no_grad():
        net[8].weight.mul_(CLASSIFIER_SCALE)
        net[8].bias.mul_(CLASSIFIER_SCALE)
    return net


def batches(n: int, side: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(INPUT_SEED)
    return [torch.rand(8, 3, side, side, generator=g, dtype=torch.float64) for _ in range(n)]


def run(reference, cfg, side: int, n: int) -> dict:
    net = model()
    adapted = reference.DeYO(cfg, net, 4)
    torch.manual_seed(SEED)
    logits = [adapted(x).detach().tolist() for x in batches(n, side)]
    params = dict(net.named_parameters())
    return {"logits": logits, "params": {k: params[k].detach().tolist() for k in TRAINED}}


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[2] / "tests/golden/deyo.json"
    reference = reference_method(sys.argv[1], "deyo")
    result = {"reference": "mariodoebler/test-time-adaptation classification/methods/deyo.py",
              "model": "tests.tta_nets.conv_net(4, seed=0), [6] AdaptiveAvgPool2d(2), [8] Linear(32, 4) after "
                       f"torch.manual_seed(1), double, classifier weight and bias x {CLASSIFIER_SCALE}",
              "classifier_scale": CLASSIFIER_SCALE, "input_seed": INPUT_SEED, "batch_size": 8, "seed": SEED,
              "trained": TRAINED, "scenarios": {}}
    for name, (options, sections, side, n) in SCENARIOS.items():
        result["scenarios"][name] = {"options": {**options, "seed": SEED}, "side": side, "batches": n,
                                     **run(reference, config(**sections), side, n)}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
