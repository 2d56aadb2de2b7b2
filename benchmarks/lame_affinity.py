"""lame's affinity on ResNet-20: one seeded batch of 200 CIFAR-10 test images (JPEG), clean and with gaussian noise
at severity 5; the error and the number of classes predicted by the source model and by lame with each affinity.
The figures in docs/results.md ("All 19 methods at full size").

    .venv/bin/python benchmarks/lame_affinity.py
"""
from __future__ import annotations

import copy

import torch

import streams
import tta
from eval.models import load_model

WEIGHTS = "../shared/data/models/akamaster-resnet-cifar10/resnet20-12fca82f.th"
DATA = "../shared/data/cifar10/cifar10-jpeg.zip"


def main() -> None:
    torch.set_num_threads(1)
    model = load_model("cifar10_resnet20", weights=WEIGHTS)
    data = streams.load_dataset(DATA, split="test")
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:200]
    x, y = data.get_batch(index)
    x = x.float() / 255
    for corruption in (None, "gaussian_noise"):
        batch = x if corruption is None else streams.corrupt(x, corruption, 5, seed=0)
        rows = {"source": tta.adapt(copy.deepcopy(model), "source")(batch)}
        for affinity in ("rbf", "knn", "linear"):
            rows[f"lame, {affinity}"] = tta.adapt(copy.deepcopy(model), "lame", affinity=affinity)(batch)
        print(f"{corruption or 'clean'}:")
        for name, logits in rows.items():
            predicted = logits.argmax(1)
            print(f"  {name}: error {100 * (predicted != y).float().mean().item():.1f} %, "
                  f"{predicted.unique().numel()} classes predicted")


if __name__ == "__main__":
    main()
