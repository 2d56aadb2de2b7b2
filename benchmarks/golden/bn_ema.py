"""Golden outputs of the reference bn_ema (MD ``classification/methods/norm.py`` class ``BNEMA``, i.e.
``methods/bn.py`` ``EMABatchNorm``) on tiny float64 models, written to ``tests/golden/bn_ema.json`` and compared by
``tests/test_method_bn_ema.py``.

Usage: ``PYTHONPATH=. python benchmarks/golden/bn_ema.py PATH`` where PATH is a checkout of
mariodoebler/test-time-adaptation (the folder holding ``classification/``; pinned commit 8b2ed63). Only
``methods/norm.py``, ``methods/bn.py``, ``methods/source.py``, ``methods/base.py`` and ``utils/registry.py`` are
imported from it; ``models.model`` (imported by ``methods/base.py`` for a type check) is a stub.

Cases: ``conv_net`` (two BatchNorm2d layers) against our ``two_pass=True`` (the reference's procedure); ``mlp_bn1d``
(one BatchNorm1d layer) and ``conv3d_net`` (one BatchNorm3d layer) against our default single pass, which equals
the reference's two passes when the model has one BatchNorm layer.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.tta_nets import conv3d_net, conv_net, mlp_bn1d  # noqa: E402

COMMIT = "8b2ed63"
BATCH, BATCHES, INPUT_SEED = 8, 3, 11
CASES = {  # name: (model builder, input shape after the batch dimension, our options)
    "conv_net_two_pass": ("conv_net", (3, 8, 8), {"two_pass": True}),
    "mlp_bn1d_one_pass": ("mlp_bn1d", (5,), {}),
    "conv3d_net_one_pass": ("conv3d_net", (2, 4, 4, 4), {}),
}
MODELS = {"conv_net": conv_net, "mlp_bn1d": mlp_bn1d, "conv3d_net": conv3d_net}


def golden_model(name: str) -> torch.nn.Module:
    return MODELS[name]().double()


def golden_batches(shape: tuple[int, ...], count: int = BATCHES, seed: int = INPUT_SEED) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, *shape, generator=g, dtype=torch.float64) * 1.5 + 0.3 for _ in range(count)]


def import_reference(checkout: str | Path) -> types.ModuleType:
    """``methods.norm`` of the reference checkout, with its heavy imports stubbed."""
    root = Path(checkout) / "classification"
    if not (root / "methods" / "norm.py").is_file():
        raise SystemExit(f"{root}/methods/norm.py not found: pass the folder holding classification/")
    sys.path.insert(0, str(root))
    models = types.ModuleType("models")
    models.__path__ = []
    model_module = types.ModuleType("models.model")
    model_module.ResNetDomainNet126 = type("ResNetDomainNet126", (torch.nn.Module,), {})
    methods = types.ModuleType("methods")  # skip methods/__init__.py (it imports every method)
    methods.__path__ = [str(root / "methods")]
    sys.modules.update({"models": models, "models.model": model_module, "methods": methods})
    import methods.norm as norm  # noqa: E402

    return norm


def reference_cfg() -> SimpleNamespace:
    ns = SimpleNamespace
    return ns(MODEL=ns(EPISODIC=False, RESET_AFTER_NUM_UPDATES=0, ADAPTATION="bnema"),
              CORRUPTION=ns(DATASET="cifar10_c"), OPTIM=ns(STEPS=1), TEST=ns(BATCH_SIZE=BATCH, WINDOW_LENGTH=1),
              MIXED_PRECISION=False)


def run_reference(norm_module, model: torch.nn.Module, batches: list[torch.Tensor]) -> dict:
    method = norm_module.BNEMA(reference_cfg(), model, 4)
    logits = []
    with torch.no_grad():
        for x in batches:
            logits.append(method(x).detach().tolist())
    buffers = {name: b.detach().tolist() for name, b in model.named_buffers()}
    return {"logits": logits, "buffers": buffers}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    norm = import_reference(sys.argv[1])
    cases = {name: run_reference(norm, golden_model(model), golden_batches(shape))
             for name, (model, shape, _) in CASES.items()}
    out = REPO / "tests" / "golden" / "bn_ema.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "reference": f"mariodoebler/test-time-adaptation@{COMMIT} classification/methods/norm.py BNEMA",
        "recipe": {"batch": BATCH, "batches": BATCHES, "input_seed": INPUT_SEED, "input": "randn * 1.5 + 0.3"},
        "cases": {name: {"model": CASES[name][0], "shape": list(CASES[name][1]), "options": CASES[name][2],
                         **values} for name, values in cases.items()}}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
