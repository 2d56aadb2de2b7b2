"""Task streams built from real layouts: Split CIFAR-10 from the JPEG zip, Split CIFAR-100 from a CIFAR-100-shaped
ImageFolder zip (no CIFAR-100 data ships here, so a tiny one is made)."""
from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from continual.benchmarks import build_benchmark


def _experience_classes(stream):
    return [sorted({int(y) for y in exp.dataset.targets}) for exp in stream]


def test_split_cifar10_from_the_jpeg_zip(cifar10_zip):
    stream = build_benchmark("split-cifar10", data=str(cifar10_zip), n_train=100, n_test=50, seed=0)
    assert stream.num_tasks == 5 and stream.classes_per_task == 2 and stream.num_classes == 10
    train = _experience_classes(stream.train_stream)
    test = _experience_classes(stream.test_stream)
    assert train == test and len(train) == 5
    assert sorted(c for classes in train for c in classes) == list(range(10))  # each class in exactly one task
    assert all(len(classes) == 2 for classes in train)
    assert sum(len(exp.dataset) for exp in stream.train_stream) == 100


def test_split_cifar100_from_an_imagefolder_zip(tmp_path):
    path = tmp_path / "cifar100.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for split, n in (("train", 2), ("test", 1)):
            for c in range(100):
                for i in range(n):
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
                    archive.writestr(f"{split}/class{c:03d}/{i}.png", buffer.getvalue())
    stream = build_benchmark("split-cifar100", data=str(path), seed=0)
    assert stream.num_tasks == 10 and stream.classes_per_task == 10 and stream.num_classes == 100
    train = _experience_classes(stream.train_stream)
    assert sorted(c for classes in train for c in classes) == list(range(100))
    assert all(len(classes) == 10 for classes in train)
