"""Golden outputs of the reference rdumb (MD ``cfgs/cifar10_c/rdumb.yaml``: ``methods/eata.py`` with
``EATA.FISHER_ALPHA: 0`` and ``MODEL.RESET_AFTER_NUM_UPDATES``, the reset done by ``methods/base.py``) on a tiny
float64 model, written to ``tests/golden/rdumb.json`` and compared by ``tests/test_method_rdumb.py``.

Usage: ``PYTHONPATH=. python benchmarks/golden/rdumb.py PATH`` (PATH: a checkout of
mariodoebler/test-time-adaptation, the folder holding ``classification/``; pinned commit 8b2ed63). The model, test
batches and reference import are those of ``benchmarks/golden/eta.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eta import (BATCH, COMMIT, INPUT_SEED, INPUT_SHIFT, LOGIT_SCALE, MODEL_SEED, NUM_CLASSES, REPO,  # noqa: E402
                 golden_batches, golden_model, import_reference, run_reference)

BATCHES = 5
CASES = {  # our options; reset_every is the reference's MODEL.RESET_AFTER_NUM_UPDATES
    "adam_reset_every_2": {"optimizer": "adam", "lr": 0.05, "d_margin": 0.9, "reset_every": 2},
    "sgd_2steps_reset_every_3": {"optimizer": "sgd", "lr": 0.05, "steps": 2, "margin_e0": 1.05, "d_margin": 0.6,
                                 "reset_every": 3},
}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    eata = import_reference(sys.argv[1])
    cases = {}
    for name, options in CASES.items():
        values = run_reference(eata, golden_model(), options, golden_batches(BATCHES))
        cases[name] = {"options": options, **values}
        print(name, "counts (reliable, selected, cumulative):", values["counts"])
    recipe = {"num_classes": NUM_CLASSES, "model_seed": MODEL_SEED, "logit_scale": LOGIT_SCALE,
              "input_shift": INPUT_SHIFT, "batch": BATCH, "batches": BATCHES, "input_seed": INPUT_SEED}
    reference = f"mariodoebler/test-time-adaptation@{COMMIT} classification/methods/eata.py + methods/base.py"
    out = REPO / "tests" / "golden" / "rdumb.json"
    out.write_text(json.dumps({"reference": reference, "recipe": recipe, "cases": cases}))


if __name__ == "__main__":
    main()
