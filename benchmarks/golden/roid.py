"""Golden outputs of ROID from the reference implementation (MD, ``classification/methods/roid.py``).

    python benchmarks/golden/roid.py PATH_TO_MD_CHECKOUT [--commit SHA] [--out tests/golden/roid.json]

A float64 ``tests.tta_nets.conv_net(num_classes=4)`` adapts on three fixed batches of 8 images (3 x 8 x 8,
uniform in [0, 1], generator seed 0) with MD's CIFAR-10-C configuration (Adam, lr 1e-3, beta1 0.9; weighting,
consistency and prior correction on; source momentum 0.99, probs momentum 0.9, temperature 1/3; TEST.BATCH_SIZE =
8, the batch size used). The random augmentation of the consistency loss is replaced on both sides by the
deterministic :func:`fixed_augment`. Recorded per batch: the returned (prior-corrected) logits and every trained
parameter after the update. tests/test_method_roid.py runs our roid on the same inputs and compares.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import _md  # noqa: E402
from tests.tta_nets import conv_net  # noqa: E402

BATCHES, BATCH_SIZE, SIZE = 3, 8, 8


def fixed_augment(x: torch.Tensor) -> torch.Tensor:
    """The deterministic stand-in for the random augmentation (the same in tests/test_method_roid.py)."""
    return (0.8 * x.flip(-1) + 0.1).roll(1, dims=-2)


def inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(BATCH_SIZE, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(BATCHES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="MD checkout (its root or its classification folder)")
    parser.add_argument("--commit", default="8b2ed63", help="the checkout's commit, recorded in the JSON")
    parser.add_argument("--out", default=str(REPO / "tests" / "golden" / "roid.json"))
    args = parser.parse_args()

    roid = _md.load(args.checkout, "methods.roid")
    cfg = _md.config(TEST={"BATCH_SIZE": BATCH_SIZE},
                     ROID={"USE_WEIGHTING": True, "USE_PRIOR_CORRECTION": True, "USE_CONSISTENCY": True,
                           "MOMENTUM_SRC": 0.99, "MOMENTUM_PROBS": 0.9, "TEMPERATURE": 1 / 3})
    torch.manual_seed(0)
    model = copy.deepcopy(conv_net(num_classes=4)).double()
    reference = roid.ROID(cfg, model, num_classes=4)
    reference.tta_transform = fixed_augment
    # MD keeps the EMA in float32 (1/4 is exact there); the float64 model needs it in float64 (the same values)
    reference.class_probs_ema = reference.class_probs_ema.double()
    steps = []
    for x in inputs():
        with torch.no_grad():
            logits = reference(x)
        steps.append({"logits": logits.tolist(),
                      "params": {name: p.detach().tolist() for name, p in model.named_parameters() if p.requires_grad},
                      "probs_ema": reference.class_probs_ema.tolist()})
    record = {"reference": f"mariodoebler/test-time-adaptation@{args.commit} classification/methods/roid.py",
              "model": "tests.tta_nets.conv_net(num_classes=4).double()",
              "inputs": f"{BATCHES} batches torch.rand({BATCH_SIZE}, 3, {SIZE}, {SIZE}), Generator seed 0, float64",
              "augment": "(0.8 * x.flip(-1) + 0.1).roll(1, dims=-2)", "steps": steps}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
