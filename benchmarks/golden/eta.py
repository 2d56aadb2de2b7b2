"""Golden outputs of the reference eta (MD ``classification/methods/eata.py`` with ``EATA.FISHER_ALPHA: 0``) on a
tiny float64 model, written to ``tests/golden/eta.json`` and compared by ``tests/test_method_eta.py``.

Usage: ``PYTHONPATH=. python benchmarks/golden/eta.py PATH`` where PATH is a checkout of
mariodoebler/test-time-adaptation (the folder holding ``classification/``; pinned commit 8b2ed63). Only
``methods/eata.py``, ``methods/base.py``, ``utils/registry.py`` and ``utils/losses.py`` are imported from it; the
data loading and model modules it imports are replaced by stubs (the source loader yields the given batches).
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
# The recipe the test rebuilds: conv_net(10 classes, seed 0) in float64 with its classifier scaled (bias zeroed) so
# that predictions are confident enough for the entropy filter (E0 = 0.4 ln 10) to keep some samples and drop others;
# inputs: Gaussian noise plus a per-image, per-channel shift, so that the predicted classes vary.
NUM_CLASSES, MODEL_SEED, LOGIT_SCALE, INPUT_SHIFT = 10, 0, 12.0, 2.0
BATCH, BATCHES, INPUT_SEED = 16, 4, 7
CASES = {  # name: options (ours) -- the reference's OPTIM/EATA values follow from them
    "adam": {"optimizer": "adam", "lr": 0.05},
    "sgd": {"optimizer": "sgd", "lr": 0.05},
    "adam_d_margin_0.9": {"optimizer": "adam", "lr": 0.05, "d_margin": 0.9},
    "sgd_e0_0.6_d_margin_0.8": {"optimizer": "sgd", "lr": 0.05, "margin_e0": 0.6, "d_margin": 0.8},
    "adam_2steps_open": {"optimizer": "adam", "lr": 0.01, "steps": 2, "margin_e0": 1.05, "d_margin": 0.6},
}


def golden_model() -> torch.nn.Module:
    model = conv_net(num_classes=NUM_CLASSES, seed=MODEL_SEED).double()
    with torch.no_grad():
        model[-1].weight.mul_(LOGIT_SCALE)
        model[-1].bias.zero_()
    return model


def golden_batches(count: int = BATCHES, seed: int = INPUT_SEED) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64)
            + INPUT_SHIFT * torch.randn(BATCH, 3, 1, 1, generator=g, dtype=torch.float64) for _ in range(count)]


def import_reference(checkout: str | Path, source_batches: list | None = None) -> types.ModuleType:
    """``methods.eata`` of the reference checkout, with its heavy imports stubbed."""
    root = Path(checkout) / "classification"
    if not (root / "methods" / "eata.py").is_file():
        raise SystemExit(f"{root}/methods/eata.py not found: pass the folder holding classification/")
    sys.path.insert(0, str(root))
    models = types.ModuleType("models")
    models.__path__ = []
    model_module = types.ModuleType("models.model")
    model_module.ResNetDomainNet126 = type("ResNetDomainNet126", (torch.nn.Module,), {})
    datasets = types.ModuleType("datasets")
    datasets.__path__ = []
    loading = types.ModuleType("datasets.data_loading")
    loading.get_source_loader = lambda **kwargs: (None, list(source_batches or []))
    methods = types.ModuleType("methods")  # skip methods/__init__.py (it imports every method)
    methods.__path__ = [str(root / "methods")]
    sys.modules.update({"models": models, "models.model": model_module, "datasets": datasets,
                        "datasets.data_loading": loading, "methods": methods})
    import methods.eata as eata  # noqa: E402

    return eata


def reference_cfg(options: dict, fisher_alpha: float, num_samples: int) -> SimpleNamespace:
    ns = SimpleNamespace
    return ns(
        MODEL=ns(EPISODIC=False, RESET_AFTER_NUM_UPDATES=options.get("reset_every", 0), ADAPTATION="eata",
                 CKPT_PATH=""),
        CORRUPTION=ns(DATASET="cifar10_c"),
        OPTIM=ns(METHOD={"adam": "Adam", "sgd": "SGD"}[options.get("optimizer", "adam")], STEPS=options.get("steps", 1),
                 LR=options["lr"], BETA=0.9, MOMENTUM=0.9, DAMPENING=0.0, NESTEROV=True, WD=0.0),
        EATA=ns(FISHER_ALPHA=fisher_alpha, D_MARGIN=options.get("d_margin", 0.4),
                MARGIN_E0=options.get("margin_e0", 0.4)),
        SOURCE=ns(NUM_SAMPLES=num_samples, PERCENTAGE=1.0, NUM_WORKERS=0),
        TEST=ns(BATCH_SIZE=BATCH, WINDOW_LENGTH=1), MIXED_PRECISION=False, DATA_DIR="")


def run_reference(eata_module, model: torch.nn.Module, options: dict, batches: list[torch.Tensor],
                  fisher_alpha: float = 0.0, num_samples: int = 0, keep: bool = False) -> dict:
    """Logits per batch, cumulative (reliable, selected) counts, the trained parameters after the last batch (and
    the reference adapter itself under ``method`` when ``keep``)."""
    model.model_preprocess = None
    method = eata_module.EATA(reference_cfg(options, fisher_alpha, num_samples), model, NUM_CLASSES)
    logits, counts = [], []
    for x in batches:
        logits.append(method(x).detach().tolist())
        counts.append([method.num_samples_update_1, method.num_samples_update_2])
    params = {name: p.detach().tolist() for name, p in model.named_parameters() if p.requires_grad}  # trained
    return {"logits": logits, "counts": counts, "params": params, **({"method": method} if keep else {})}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    eata = import_reference(sys.argv[1])
    cases = {name: run_reference(eata, golden_model(), options, golden_batches()) for name, options in CASES.items()}
    out = REPO / "tests" / "golden" / "eta.json"
    recipe = {"num_classes": NUM_CLASSES, "model_seed": MODEL_SEED, "logit_scale": LOGIT_SCALE,
              "input_shift": INPUT_SHIFT, "batch": BATCH, "batches": BATCHES, "input_seed": INPUT_SEED}
    reference = f"mariodoebler/test-time-adaptation@{COMMIT} classification/methods/eata.py"
    out.write_text(json.dumps({"reference": reference, "recipe": recipe,
                               "cases": {name: {"options": CASES[name], **values} for name, values in cases.items()}}))
    for name, values in cases.items():
        print(name, "counts (reliable, selected, cumulative):", values["counts"])


if __name__ == "__main__":
    main()
