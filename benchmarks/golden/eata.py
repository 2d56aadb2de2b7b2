"""Golden outputs of the reference eata (MD ``classification/methods/eata.py`` with a Fisher regulariser) on a tiny
float64 model, written to ``tests/golden/eata.json`` and compared by ``tests/test_method_eata.py``.

Usage: ``PYTHONPATH=. python benchmarks/golden/eata.py PATH`` (PATH: a checkout of mariodoebler/test-time-adaptation,
the folder holding ``classification/``; pinned commit 8b2ed63). The model, test batches and reference import are
those of ``benchmarks/golden/eta.py``; the reference's source loader is stubbed to yield the source batches below,
from which its constructor computes the Fisher diagonal (recorded too).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eta import (BATCH, BATCHES, COMMIT, INPUT_SEED, INPUT_SHIFT, LOGIT_SCALE, MODEL_SEED, NUM_CLASSES,  # noqa: E402
                 REPO, golden_batches, golden_model, import_reference, run_reference)

SOURCE_BATCHES, SOURCE_SEED = 3, 11
CASES = {  # name: our options (fisher_alpha is the reference's EATA.FISHER_ALPHA)
    "adam_alpha_1": {"optimizer": "adam", "lr": 0.05, "d_margin": 0.9, "fisher_alpha": 1.0},
    "adam_alpha_2000": {"optimizer": "adam", "lr": 0.05, "d_margin": 0.9, "fisher_alpha": 2000.0},
    "sgd_alpha_500_open": {"optimizer": "sgd", "lr": 0.05, "steps": 2, "margin_e0": 1.05, "d_margin": 0.6,
                           "fisher_alpha": 500.0},
}


def source_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Source images as (x, y) pairs (the labels are ignored by the Fisher: its targets are pseudo-labels)."""
    xs = golden_batches(SOURCE_BATCHES, SOURCE_SEED)
    return [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    eata = import_reference(sys.argv[1], source_batches())
    cases = {}
    for name, options in CASES.items():
        model = golden_model()
        values = run_reference(eata, model, options, golden_batches(), fisher_alpha=options["fisher_alpha"],
                               num_samples=SOURCE_BATCHES * BATCH, keep=True)
        method = values.pop("method")
        values["fisher"] = {name: pair[0].tolist() for name, pair in method.fishers.items()}
        values["anchors"] = {name: pair[1].tolist() for name, pair in method.fishers.items()}
        cases[name] = {"options": options, **values}
        print(name, "counts (reliable, selected, cumulative):", values["counts"])
    recipe = {"num_classes": NUM_CLASSES, "model_seed": MODEL_SEED, "logit_scale": LOGIT_SCALE,
              "input_shift": INPUT_SHIFT, "batch": BATCH, "batches": BATCHES, "input_seed": INPUT_SEED,
              "source_batches": SOURCE_BATCHES, "source_seed": SOURCE_SEED}
    reference = f"mariodoebler/test-time-adaptation@{COMMIT} classification/methods/eata.py"
    out = REPO / "tests" / "golden" / "eata.json"
    out.write_text(json.dumps({"reference": reference, "recipe": recipe, "cases": cases}))


if __name__ == "__main__":
    main()
