"""Golden outputs of the official T3A (matsuolab/T3A ``domainbed/adapt_algorithms.py`` class ``T3A``) on tiny
float64 models, written to ``tests/golden/t3a.json`` and compared by ``tests/test_method_t3a.py``.

Usage: ``PYTHONPATH=. python benchmarks/golden/t3a.py PATH`` where PATH is a checkout of matsuolab/T3A (the folder
holding ``domainbed/``; pinned commit ff8cde5). Only ``domainbed/adapt_algorithms.py`` is imported from it; the
``domainbed.algorithms`` module it imports (for the ``Algorithm`` base class, an nn.Module keeping ``hparams``) is
a stub. The featurizer is the model up to its last layer, the classifier its last nn.Linear; each batch is passed
with ``adapt=True``. LINs-lab/ttab's ``t3a.py`` (default ``top_M`` 100) is the same algorithm; it is not run here
(it needs the whole ttab package).
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.tta_nets import conv_net, mlp_bn1d  # noqa: E402

COMMIT = "ff8cde5"
BATCH, BATCHES, INPUT_SEED = 16, 4, 2
CASES = {  # name: (model, our filter_k); the official filter_K is the same number
    "mlp_k100": ("mlp_bn1d", 100),
    "mlp_k3": ("mlp_bn1d", 3),
    "mlp_k1": ("mlp_bn1d", 1),
    "conv_k2": ("conv_net", 2),
}
SHAPES = {"mlp_bn1d": (5,), "conv_net": (3, 8, 8)}


def golden_model(name: str) -> torch.nn.Sequential:
    """mlp_bn1d with seed 1 (its predictions spread over the 3 classes) or conv_net (seed 0), in float64."""
    return (mlp_bn1d(seed=1) if name == "mlp_bn1d" else conv_net()).double()


def golden_batches(name: str, count: int = BATCHES, seed: int = INPUT_SEED) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, *SHAPES[name], generator=g, dtype=torch.float64) for _ in range(count)]


def import_reference(checkout: str | Path) -> types.ModuleType:
    """``domainbed.adapt_algorithms`` of the official checkout, with ``domainbed.algorithms`` stubbed."""
    root = Path(checkout)
    if not (root / "domainbed" / "adapt_algorithms.py").is_file():
        raise SystemExit(f"{root}/domainbed/adapt_algorithms.py not found: pass the folder holding domainbed/")
    domainbed = types.ModuleType("domainbed")  # skip domainbed/__init__.py and its imports
    domainbed.__path__ = [str(root / "domainbed")]
    algorithms = types.ModuleType("domainbed.algorithms")

    class Algorithm(torch.nn.Module):
        def __init__(self, input_shape, num_classes, num_domains, hparams):
            super().__init__()
            self.hparams = hparams

    algorithms.Algorithm = Algorithm
    sys.modules.update({"domainbed": domainbed, "domainbed.algorithms": algorithms})
    import domainbed.adapt_algorithms as adapt_algorithms  # noqa: E402

    return adapt_algorithms


def run_reference(module, model_name: str, filter_k: int) -> dict:
    model = golden_model(model_name)
    trained = types.SimpleNamespace(featurizer=model[:-1], classifier=model[-1])
    num_classes = model[-1].out_features
    method = module.T3A(None, num_classes, 1, {"filter_K": filter_k, "cached_loader": False}, trained)
    # Its one-hot labels are float32 (``.float()``); held as float64 (exact 0/1 either way), torch.cat promotes each
    # batch's float32 rows, and ``supports.T @ labels`` runs in float64 like the model.
    method.warmup_labels = method.labels = method.warmup_labels.double()
    logits, sizes = [], []
    with torch.no_grad():
        for x in golden_batches(model_name):
            logits.append(method(x, adapt=True).tolist())
            sizes.append(method.labels.sum(0).long().tolist())  # supports per class after the batch
    return {"logits": logits, "supports_per_class": sizes}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    module = import_reference(sys.argv[1])
    cases = {name: run_reference(module, model, k) for name, (model, k) in CASES.items()}
    out = REPO / "tests" / "golden" / "t3a.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "reference": f"matsuolab/T3A@{COMMIT} domainbed/adapt_algorithms.py T3A",
        "recipe": {"batch": BATCH, "batches": BATCHES, "input_seed": INPUT_SEED, "mlp_bn1d_seed": 1},
        "cases": {name: {"model": CASES[name][0], "shape": list(SHAPES[CASES[name][0]]),
                         "options": {"filter_k": CASES[name][1]}, **values} for name, values in cases.items()}}))
    for name, values in cases.items():
        print(name, "supports per class:", values["supports_per_class"])


if __name__ == "__main__":
    main()
