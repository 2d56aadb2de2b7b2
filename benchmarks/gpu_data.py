"""Prepare the small data folder that ``benchmarks/gpu_check.sh`` reads on a GPU machine without the shared data.

Extracts a class-balanced subset of the CIFAR-10 JPEG zip (ImageFolder layout: ``test/<class>/*.jpg`` and
``train/<class>/*.jpg``) and copies the ResNet-56 weights and the frost photographs beside it, into a folder
that git ignores (default ``.gpu_data``), small enough to travel with the working tree:

    python benchmarks/gpu_data.py --shared ../shared/data --out .gpu_data --test-per-class 100 --train-per-class 50
"""
from __future__ import annotations

import argparse
import shutil
import zipfile
from pathlib import Path

WEIGHTS = "models/akamaster-resnet-cifar10/resnet56-4bfd9763.th"


def extract_subset(archive: Path, out: Path, split: str, per_class: int) -> int:
    """The first ``per_class`` images of each class of ``split`` (members sorted by name); returns how many."""
    with zipfile.ZipFile(archive) as handle:
        names = sorted(n for n in handle.namelist() if n.startswith(f"{split}/") and n.endswith(".jpg"))
        taken: dict[str, int] = {}
        for name in names:
            label = name.split("/")[1]
            if taken.get(label, 0) >= per_class:
                continue
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(handle.read(name))
            taken[label] = taken.get(label, 0) + 1
    return sum(taken.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default="../shared/data", help="the shared data folder")
    parser.add_argument("--out", default=".gpu_data")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=50, help="labelled source images for cafa")
    args = parser.parse_args()
    shared, out = Path(args.shared), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    archive = shared / "cifar10" / "cifar10-jpeg.zip"
    counts = {split: extract_subset(archive, out / "cifar10-subset", split, n)
              for split, n in (("test", args.test_per_class), ("train", args.train_per_class))}
    shutil.copy(shared / WEIGHTS, out / Path(WEIGHTS).name)
    shutil.copytree(shared / "frost", out / "frost")
    print(f"{out}: {counts['test']} test and {counts['train']} train images, {Path(WEIGHTS).name}, frost/")


if __name__ == "__main__":
    main()
