"""Golden outputs of the reference SAR (mariodoebler/test-time-adaptation, classification/methods/sar.py) on a tiny
float64 model, for tests/test_method_sar.py.

    python benchmarks/golden/sar.py /path/to/test-time-adaptation [tests/golden/sar.json]

The model is tests/tta_nets.conv_net(4, seed=0) in float64 with its classifier scaled by CLASSIFIER_SCALE (so
that the entropy filters keep some samples and drop others); batches are torch.rand from a seeded generator.
Each scenario records, per batch, the logits the reference returns and its entropy moving average, and the
BatchNorm affine parameters after the last batch. Scenarios avoid what we do differently on purpose (a step whose
filters keep no sample; steps after a model recovery, where the reference keeps its SGD momentum).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reference import config, reference_method  # noqa: E402
from tests.tta_nets import conv_net  # noqa: E402

CLASSIFIER_SCALE = 16.0
INPUT_SEED = 7
BATCH_SHAPE = (8, 3, 8, 8)
TRAINED = ["1.weight", "1.bias", "4.weight", "4.bias"]  # the two BatchNorm layers' affine parameters


def model() -> torch.nn.Module:
    net = conv_net(4, seed=0).double()
    with torch.no_grad():
        net[8].weight.mul_(CLASSIFIER_SCALE)
        net[8].bias.mul_(CLASSIFIER_SCALE)
    return net


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(INPUT_SEED)
    return [torch.rand(BATCH_SHAPE, generator=g, dtype=torch.float64) for _ in range(n)]


def run(reference, cfg, n: int) -> dict:
    net = model()
    adapted = reference.SAR(cfg, net, 4)
    logits, ema = [], []
    for x in batches(n):
        logits.append(adapted(x).detach().tolist())
        ema.append(adapted.ema)
    params = dict(net.named_parameters())
    return {"logits": logits, "ema": ema, "params": {k: params[k].detach().tolist() for k in TRAINED}}


def main() -> None:
    checkout = sys.argv[1] if len(sys.argv) > 1 else None
    if checkout is None:
        raise SystemExit(__doc__)
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[2] / "tests/golden/sar.json"
    reference = reference_method(checkout, "sar")
    torch.manual_seed(0)
    scenarios = {"default": ({}, {}, 3), "two_steps": ({"steps": 2}, {"OPTIM": {"STEPS": 2}}, 2),
                 "margin_0.3": ({"margin_e0": 0.3}, {"EATA": {"MARGIN_E0": 0.3}}, 3),
                 "lr_0.05": ({"lr": 0.05}, {"OPTIM": {"LR": 0.05}}, 3)}
    result = {"reference": "mariodoebler/test-time-adaptation classification/methods/sar.py",
              "model": f"tests.tta_nets.conv_net(4, seed=0).double(), classifier weight and bias x {CLASSIFIER_SCALE}",
              "classifier_scale": CLASSIFIER_SCALE, "input_seed": INPUT_SEED, "batch_shape": list(BATCH_SHAPE),
              "trained": TRAINED, "scenarios": {}}
    for name, (options, sections, n) in scenarios.items():
        result["scenarios"][name] = {"options": options, "batches": n, **run(reference, config(**sections), n)}
    # Model recovery on the second batch: a reset constant between the moving average after batch 1 and batch 2.
    # (lr 0.05, where the entropy falls fast enough).
    ema = result["scenarios"]["lr_0.05"]["ema"]
    assert ema[1] < ema[0], ema
    constant = (ema[0] + ema[1]) / 2
    cfg = config(SAR={"RESET_CONSTANT_EM": constant}, OPTIM={"LR": 0.05})
    result["scenarios"]["recovery"] = {"options": {"lr": 0.05, "reset_constant": constant}, "batches": 2,
                                       **run(reference, cfg, 2)}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}; lr 0.05 ema {ema}")


if __name__ == "__main__":
    main()
