"""Golden outputs of MEMO from the reference implementation (MD, ``classification/methods/memo.py`` with its
AlphaBatchNorm, ``methods/bn.py``).

    python benchmarks/golden/memo.py PATH_TO_MD_CHECKOUT [--commit SHA] [--out tests/golden/memo.json]

A float64 ``tests.tta_nets.conv_net(num_classes=4)`` adapts, episodically, on three fixed images (3 x 8 x 8,
uniform in [0, 1], generator seed 0), one at a time as MD's configuration does (TEST.BATCH_SIZE 1), with MD's
CIFAR-10-C settings (SGD, lr 0.005, momentum 0.9, Nesterov, dampening 0, no weight decay; BN.ALPHA 0.1). MD's data
loader hands it [image, view_1, ..., view_N]; the random AugMix views are replaced by the deterministic
:func:`fixed_views` (N = 4), which tests/test_method_memo.py gives our memo too. Recorded per image: the logits of
the adapted model on the image and every parameter after its update.
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

IMAGES, SIZE, VIEWS = 3, 8, 4


def fixed_views(image: torch.Tensor, n: int = VIEWS) -> torch.Tensor:
    """(n, C, H, W) deterministic stand-ins for the AugMix views (the same in tests/test_method_memo.py)."""
    views = [(image * (0.7 + 0.1 * k) + 0.05 * k).roll(k, dims=-1) for k in range(n)]
    return torch.stack([v.flip(-2) if k % 2 else v for k, v in enumerate(views)])


def images() -> torch.Tensor:
    return torch.rand(IMAGES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="MD checkout (its root or its classification folder)")
    parser.add_argument("--commit", default="8b2ed63", help="the checkout's commit, recorded in the JSON")
    parser.add_argument("--out", default=str(REPO / "tests" / "golden" / "memo.json"))
    args = parser.parse_args()

    memo = _md.load(args.checkout, "methods.memo")
    cfg = _md.config(MODEL={"EPISODIC": True}, TEST={"BATCH_SIZE": 1, "N_AUGMENTATIONS": VIEWS},
                     OPTIM={"METHOD": "SGD", "LR": 0.005, "STEPS": 1}, BN={"ALPHA": 0.1})
    model = copy.deepcopy(conv_net(num_classes=4)).double()
    reference = memo.MEMO(cfg, model, num_classes=4)
    model.double()  # AlphaBatchNorm's statistics module is created in float32; the parameters are float64 already
    steps = []
    for image in images():
        with torch.no_grad():  # as MD's evaluation loop; MEMO enables gradients for its update
            logits = reference([image[None], *fixed_views(image)[:, None]])
        steps.append({"logits": logits.tolist(),
                      "params": {name.replace(".layer.", "."): p.detach().tolist()
                                 for name, p in model.named_parameters()}})
    record = {"reference": f"mariodoebler/test-time-adaptation@{args.commit} classification/methods/memo.py",
              "model": "tests.tta_nets.conv_net(num_classes=4).double()",
              "inputs": f"torch.rand({IMAGES}, 3, {SIZE}, {SIZE}), Generator seed 0, float64; one image per call",
              "views": "fixed_views(image, 4) of benchmarks/golden/memo.py", "steps": steps}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
