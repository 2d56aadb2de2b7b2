"""How concentrated the TRUE labels of a label-correlated stream are, as the collapse guard would see them.

Prints the normalised entropy (0 = one class, 1 = uniform; `tta.guard.normalised_entropy`) of the true-label
histogram over single batches and over the guard's default 1,000-sample window, for the `correlated` stream of
docs/results.md (CIFAR-10 JPEG test split, 2,000 images per corruption, batch 200, Dirichlet delta 0.1) and for
the i.i.d. `reset` stream. Labels only: no model, a few seconds.

    .venv/bin/python benchmarks/correlated_label_entropy.py [DELTA]
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import streams
from streams.protocols import make_protocol
from streams.stream import make_stream
from tta.guard import normalised_entropy

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10-jpeg.zip"


def main(delta: float = 0.1, window: int = 1000, batch: int = 200) -> None:
    data = streams.load_imagefolder(DATA, split="test")
    labels = np.asarray(data.labels)
    for kind in ("correlated", "reset"):
        stream = make_stream(data, make_protocol(kind, corruptions="all", severity=5, batch_size=batch, seed=0,
                                                 n_images=2000, delta=delta))
        windows, batches = [], []
        for segment in range(len(stream.segments)):
            y = torch.as_tensor(labels[stream.order(segment)[1]])
            windows += [normalised_entropy(torch.bincount(y[s:s + window], minlength=10))
                        for s in range(0, len(y) - window + 1, batch)]
            batches += [normalised_entropy(torch.bincount(y[s:s + batch], minlength=10))
                        for s in range(0, len(y), batch)]
        print(f"{kind}: {window}-sample windows: min {min(windows):.2f}, median {np.median(windows):.2f}; "
              f"single batches of {batch}: min {min(batches) + 0.0:.2f}, median {np.median(batches):.2f}")


if __name__ == "__main__":
    main(*(float(a) for a in sys.argv[1:2]))
