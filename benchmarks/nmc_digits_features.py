"""Why NMC sits where it does in the split-digits study: the geometry of the frozen features of the new classes.

Rebuilds each (split, seed) backbone of ``benchmarks/nmc_digits.py`` (pre-training is deterministic: the script
checks that the fingerprint equals the one in the run's backbone record) and measures, on the L2-normalised
features NMC and the linear probe see, over the training images of the incremental classes:

* ``within``: root-mean-square distance of a feature to its class mean;
* ``between``: mean distance between two class means;
* ``effective dim``: participation ratio (sum of the covariance eigenvalues)^2 / (sum of their squares) of all
  those features (1 = everything on one line);
* the training accuracy of the nearest class mean and of the linear probe fitted on all of them at once.

Usage: PYTHONPATH=. python benchmarks/nmc_digits_features.py [DIR]  -> DIR/features.md (default the study's DIR)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual.config import ContinualConfig  # noqa: E402
from continual.pretrain import fingerprint, pretrain  # noqa: E402
from continual.probe import fit_softmax_regression  # noqa: E402
from continual.records import backbone_records, read_records  # noqa: E402
from continual.runner import build_network, build_seed_stream, seed_everything  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "continual" / "nmc-digits"


def geometry(run: Path, seed: int) -> dict[str, float]:
    """The measurements of the module docstring for one seed of one run folder (a ``--pretrain-classes`` run)."""
    config = ContinualConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    record = next(r for r in backbone_records(read_records(run / "results.jsonl")) if r["seed"] == seed)
    seed_everything(seed)  # as run_seed: the same RNG states before the stream, the model and pre-training
    stream = build_seed_stream(config, seed)
    model, _ = build_network(config, stream, num_classes=len(stream.pretrain_classes))
    pretrain(model, stream.pretrain_train, epochs=config.pretrain_epochs, lr=config.pretrain_lr,
             batch_size=config.pretrain_batch_size, seed=seed)
    if fingerprint(model) != record["fingerprint"]:
        raise RuntimeError(f"{run} seed {seed}: the rebuilt backbone differs from the recorded one")
    images = torch.cat([torch.stack([x for x, *_ in e.dataset]) for e in stream.train_stream])
    labels = torch.cat([torch.tensor([int(y) for _, y, *_ in e.dataset]) for e in stream.train_stream])
    with torch.no_grad():
        f = F.normalize(model.forward_features(images).flatten(1), dim=1).double()
    classes = labels.unique()
    means = torch.stack([f[labels == c].mean(0) for c in classes])
    within = float(((f - means[torch.searchsorted(classes, labels)]) ** 2).sum(1).mean().sqrt())
    between = float(torch.pdist(means).mean())
    eigen = torch.linalg.eigvalsh(torch.cov(f.T)).clamp(min=0)
    nearest = torch.cdist(f, means).argmin(1)
    W, b, _ = fit_softmax_regression(f, labels, len(classes), config.probe_l2)
    return {"within": within, "between": between, "effective_dim": float(eigen.sum() ** 2 / (eigen ** 2).sum()),
            "dim": f.shape[1], "nmc_train": float((classes[nearest] == labels).double().mean()),
            "probe_train": float(((f @ W.T + b).argmax(1) == labels).double().mean())}


def main(root: Path = OUT) -> int:
    torch.set_num_threads(1)
    lines = ["| backbone trained on | within-class RMS | between-mean distance | effective dim (of d) | "
             "NMC train accuracy | probe train accuracy |", "|---|---|---|---|---|---|"]
    for run in sorted(root.glob("k*-nmc"), key=lambda p: -int(p.name[1:].split("-")[0])):
        seeds = json.loads((run / "config.json").read_text())["config"]["seeds"]
        rows = [geometry(run, seed) for seed in seeds]
        trained = backbone_records(read_records(run / "results.jsonl"))[0]["trained_on_class_names"]

        def cell(key: str, scale: float = 1.0, digits: int = 3) -> str:
            values = np.array([r[key] for r in rows]) * scale
            return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"

        lines.append(f"| digits {', '.join(trained)} | {cell('within')} | {cell('between')} | "
                     f"{cell('effective_dim', digits=1)} (of {rows[0]['dim']}) | {cell('nmc_train', 100, 1)} | "
                     f"{cell('probe_train', 100, 1)} |")
    text = ("Features of the incremental classes' training images (L2-normalised), mean ± std over seeds "
            f"{', '.join(map(str, seeds))}\n\n" + "\n".join(lines) + "\n")
    (root / "features.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
