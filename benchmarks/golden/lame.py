"""Golden outputs of the reference lame (MD ``classification/methods/lame.py``) on a tiny float64 model, written to
``tests/golden/lame.json`` and compared by ``tests/test_method_lame.py``.

Usage: ``PYTHONPATH=. python benchmarks/golden/lame.py PATH`` where PATH is a checkout of
mariodoebler/test-time-adaptation (the folder holding ``classification/``; pinned commit 8b2ed63). Only
``methods/lame.py``, ``methods/base.py`` and ``utils/registry.py`` are imported from it; ``models.model`` is a stub
whose ``split_up_model`` splits ``conv_net`` into its layers before the classifier and the classifier.

The reference returns the assignments z (probabilities); the JSON keeps them, and the test compares them with the
softmax of our logits.
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

from tests.tta_nets import conv_net  # noqa: E402

COMMIT = "8b2ed63"
# conv_net(4 classes, seed 0) in float64, its classifier scaled so that the predictions are neither uniform nor
# one-hot (the Laplacian term then moves them visibly).
LOGIT_SCALE = 3.0
BATCHES, INPUT_SEED = 3, 5
CASES = {  # name: (batch size, our options); the reference's cfg.LAME follows from them
    "rbf_default": (16, {}),
    "knn_symmetric": (16, {"affinity": "knn", "knn": 3, "force_symmetry": True}),
    "knn": (12, {"affinity": "knn"}),
    "linear": (12, {"affinity": "linear"}),
    "rbf_batch_below_k": (3, {}),
}


def golden_model() -> torch.nn.Module:
    model = conv_net(num_classes=4, seed=0).double()
    with torch.no_grad():
        model[-1].weight.mul_(LOGIT_SCALE)
    return model


def golden_batches(batch: int, count: int = BATCHES, seed: int = INPUT_SEED) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(count)]


def import_reference(checkout: str | Path) -> types.ModuleType:
    """``methods.lame`` of the reference checkout, with its heavy imports stubbed."""
    root = Path(checkout) / "classification"
    if not (root / "methods" / "lame.py").is_file():
        raise SystemExit(f"{root}/methods/lame.py not found: pass the folder holding classification/")
    sys.path.insert(0, str(root))
    models = types.ModuleType("models")
    models.__path__ = []
    model_module = types.ModuleType("models.model")
    model_module.ResNetDomainNet126 = type("ResNetDomainNet126", (torch.nn.Module,), {})
    model_module.split_up_model = lambda model, arch, dataset: (model[:-1], model[-1])
    methods = types.ModuleType("methods")  # skip methods/__init__.py (it imports every method)
    methods.__path__ = [str(root / "methods")]
    sys.modules.update({"models": models, "models.model": model_module, "methods": methods})
    import methods.lame as lame  # noqa: E402

    return lame


def reference_cfg(options: dict, batch: int) -> SimpleNamespace:
    ns = SimpleNamespace
    affinity = {"rbf": "rbf", "knn": "kNN", "linear": "linear"}[options.get("affinity", "rbf")]
    return ns(MODEL=ns(EPISODIC=False, RESET_AFTER_NUM_UPDATES=0, ADAPTATION="lame", ARCH="Standard"),
              CORRUPTION=ns(DATASET="cifar10_c"), OPTIM=ns(STEPS=1), TEST=ns(BATCH_SIZE=batch, WINDOW_LENGTH=1),
              MIXED_PRECISION=False,
              LAME=ns(AFFINITY=affinity, KNN=options.get("knn", 5), SIGMA=1.0,
                      FORCE_SYMMETRY=options.get("force_symmetry", False)))


def run_reference(lame_module, options: dict, batch: int) -> dict:
    model = golden_model()  # built under the default float32 dtype, as in the test, then cast
    inputs = golden_batches(batch)
    # the reference's kNN affinity allocates W with the default dtype: float64 while it runs, like the model
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        method = lame_module.LAME(reference_cfg(options, batch), model, 4)
        with torch.no_grad():
            outputs = [method(x).detach().tolist() for x in inputs]
    finally:
        torch.set_default_dtype(default)
    return {"probabilities": outputs}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    lame = import_reference(sys.argv[1])
    cases = {name: run_reference(lame, options, batch) for name, (batch, options) in CASES.items()}
    out = REPO / "tests" / "golden" / "lame.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "reference": f"mariodoebler/test-time-adaptation@{COMMIT} classification/methods/lame.py",
        "recipe": {"logit_scale": LOGIT_SCALE, "batches": BATCHES, "input_seed": INPUT_SEED},
        "cases": {name: {"batch": CASES[name][0], "options": CASES[name][1], **values}
                  for name, values in cases.items()}}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
