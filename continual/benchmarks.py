"""Task streams as Avalanche benchmarks, built from the datasets of ``streams/``.

* ``split-digits`` (default; scikit-learn's embedded digits, no download): 5 tasks x 2 classes.
* ``split-cifar10``: 5 x 2 classes, from the CIFAR python layout or an ImageFolder zip (the JPEG zip).
* ``split-cifar100``: 10 x 10 classes, same sources.
* ``random-labels``: a plasticity benchmark: the same inputs in every task, labels re-drawn uniformly at
  random per task (seeded). Its test stream is the training inputs with each task's labels: the accuracy is the
  memorisation (training) accuracy, the quantity that measures plasticity; random labels cannot generalise.

Class-incremental streams relabel classes by their position in the class order (natural order, or a seeded
permutation with ``shuffle_classes``), so task ``k`` holds labels ``k*c .. (k+1)*c - 1`` and
``label // classes_per_task`` is a sample's task (what AdaB2N needs). Experiences are built with Avalanche's
``class_incremental_benchmark`` / ``benchmark_from_datasets``; items are ``(x, y, task_label=0)`` with ``x``
float in [0, 1]. ``n_train`` / ``n_test`` take seeded class-balanced subsets first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils.classification_dataset import _as_taskaware_supervised_classification_dataset

from streams.datasets import class_balanced_subset, load_dataset, load_digits

BENCHMARKS: dict[str, dict] = {
    "split-digits": {"source": "digits", "tasks": 5, "classes": 10},
    "split-cifar10": {"source": "cifar10", "tasks": 5, "classes": 10},
    "split-cifar100": {"source": "cifar100", "tasks": 10, "classes": 100},
    "random-labels": {"source": "digits", "tasks": 10, "classes": 10},
}
REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


class TensorImages(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images and int64 labels; items are (float image in [0, 1], int label)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images, self.labels = images, labels.long()
        self.targets = self.labels.tolist()  # what Avalanche reads to split by class

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i].float().div_(255.0), int(self.labels[i])


@dataclass
class TaskStream:
    """An Avalanche scenario plus what a runner needs to know about it."""

    name: str
    scenario: object  # avalanche CLScenario with train_stream and test_stream
    num_tasks: int
    classes_per_task: int
    num_classes: int
    image_shape: tuple[int, int, int]
    class_order: list[int]
    n_train: int
    n_test: int
    source: str
    kind: str = "class-incremental"
    notes: list[str] = field(default_factory=list)
    task_sizes: list[int] = field(default_factory=list)  # classes per task ([] : classes_per_task each)
    pretrain_classes: list[int] = field(default_factory=list)  # original class ids held out for pre-training
    class_names: list[str] = field(default_factory=list)  # the data's class names, by original class id
    pretrain_train: TensorImages | None = None  # training images of the held-out classes, labels 0..K-1
    pretrain_test: TensorImages | None = None  # their test images (to report the backbone's own accuracy)

    @property
    def incremental_classes(self) -> list[int]:
        """Original class ids of the stream's labels 0..num_classes-1, in the order they arrive."""
        return self.class_order[len(self.pretrain_classes):]

    @property
    def train_stream(self):
        return self.scenario.train_stream

    @property
    def test_stream(self):
        return self.scenario.test_stream


def shared_data_dir() -> Path:
    """The shared data folder: ``$TTA_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("TTA_SHARED_DATA", REPO.parent / "shared" / "data"))


def default_data(source: str) -> str:
    """Where a source is read from when ``--data`` is not given."""
    if source == "digits":
        return "digits"
    if source == "cifar10":
        zip_path = shared_data_dir() / "cifar10" / "cifar10-jpeg.zip"
        if zip_path.exists():
            return str(zip_path)
    where = (f" (looked for {shared_data_dir() / 'cifar10' / 'cifar10-jpeg.zip'}; TTA_SHARED_DATA moves it)"
             if source == "cifar10" else "")
    raise FileNotFoundError(f"no default location for {source}{where}: pass --data, either a folder holding the "
                            f"CIFAR python version ({CIFAR_ARCHIVES.get(source, source)} from "
                            "https://www.cs.toronto.edu/~kriz/cifar.html, unpacked) or an ImageFolder .zip with "
                            "train/ and test/")


def load_split(spec: str, split: str, image_size: int | None = None, data_seed: int = 0):
    """A streams ImageDataset; ``image_size`` resizes digits (other sources keep their stored size)."""
    if spec == "digits":
        return load_digits(split=split, size=image_size or 32, seed=data_seed)
    return load_dataset(spec, split=split)


def _subset(dataset, n: int | None, seed: int):
    if n is None or n >= len(dataset):
        return dataset
    return class_balanced_subset(dataset, n, seed)


def incremental_task_sizes(num_classes: int, tasks: int, pretrain_classes: int = 0) -> list[int]:
    """Classes per task of the stream over the classes left after pre-training: tasks of the usual size
    ``num_classes / tasks``, the last one holding the remainder (``(10, 5, 5) -> [2, 2, 1]``)."""
    if num_classes % tasks:
        raise ValueError(f"{num_classes} classes do not split into {tasks} equal tasks")
    if not 0 <= pretrain_classes < num_classes:
        raise ValueError(f"pretrain_classes must be in [0, {num_classes - 1}], got {pretrain_classes}")
    per_task, left = num_classes // tasks, num_classes - pretrain_classes
    return [per_task] * (left // per_task) + ([left % per_task] if left % per_task else [])


def _class_incremental(name: str, train, test, num_tasks: int, seed: int, shuffle_classes: bool,
                       source: str, pretrain_classes: int = 0) -> TaskStream:
    num_classes = len(train.classes)
    sizes = incremental_task_sizes(num_classes, num_tasks, pretrain_classes)
    order = list(range(num_classes))
    if shuffle_classes:
        order = np.random.default_rng(seed).permutation(num_classes).tolist()
    position = torch.empty(num_classes, dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(num_classes)
    k = pretrain_classes
    train_pos, test_pos = position[train.labels], position[test.labels]
    if k == 0:
        datasets = {"train": TensorImages(train.images, train_pos), "test": TensorImages(test.images, test_pos)}
        scenario = class_incremental_benchmark(datasets, class_order=list(range(num_classes)),
                                               num_experiences=num_tasks)
        return TaskStream(name, scenario, num_tasks, num_classes // num_tasks, num_classes,
                          tuple(train.images.shape[1:]), order, len(train), len(test), source,
                          task_sizes=sizes, class_names=list(train.classes))
    keep_train, keep_test = train_pos >= k, test_pos >= k
    datasets = {"train": TensorImages(train.images[keep_train], train_pos[keep_train] - k),
                "test": TensorImages(test.images[keep_test], test_pos[keep_test] - k)}
    scenario = class_incremental_benchmark(datasets, class_order=list(range(num_classes - k)),
                                           num_classes_per_exp=sizes)
    return TaskStream(name, scenario, len(sizes), num_classes // num_tasks, num_classes - k,
                      tuple(train.images.shape[1:]), order, int(keep_train.sum()), int(keep_test.sum()), source,
                      task_sizes=sizes, pretrain_classes=order[:k], class_names=list(train.classes),
                      pretrain_train=TensorImages(train.images[~keep_train], train_pos[~keep_train]),
                      pretrain_test=TensorImages(test.images[~keep_test], test_pos[~keep_test]))


def _random_labels(train, num_tasks: int, num_classes: int, seed: int, source: str) -> TaskStream:
    generator = torch.Generator().manual_seed(seed)
    train_sets, test_sets = [], []
    for _ in range(num_tasks):
        labels = torch.randint(0, num_classes, (len(train),), generator=generator)
        train_sets.append(_as_taskaware_supervised_classification_dataset(TensorImages(train.images, labels)))
        test_sets.append(_as_taskaware_supervised_classification_dataset(TensorImages(train.images, labels)))
    scenario = benchmark_from_datasets(train=train_sets, test=test_sets)
    return TaskStream("random-labels", scenario, num_tasks, num_classes, num_classes, tuple(train.images.shape[1:]),
                      list(range(num_classes)), len(train), len(train), source, kind="random-labels",
                      notes=["test stream = training inputs with each task's labels (memorisation accuracy)"])


def build_benchmark(name: str, data: str | None = None, seed: int = 0, tasks: int | None = None,
                    n_train: int | None = None, n_test: int | None = None, image_size: int | None = None,
                    shuffle_classes: bool = False, random_label_classes: int = 10,
                    pretrain_classes: int = 0) -> TaskStream:
    """Build a task stream by name (see :data:`BENCHMARKS`). ``data`` overrides the source (digits, a CIFAR
    folder or an ImageFolder zip); subsets and random labels are seeded with ``seed``. ``pretrain_classes``:
    hold the first K classes of the order out for pre-training (module docstring)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    spec = data or default_data(BENCHMARKS[name]["source"])
    num_tasks = tasks or BENCHMARKS[name]["tasks"]
    train = _subset(load_split(spec, "train", image_size), n_train, seed)
    if name == "random-labels":
        if pretrain_classes:
            raise ValueError("random-labels has no classes to hold out for pre-training")
        return _random_labels(train, num_tasks, random_label_classes, seed, spec)
    if pretrain_classes and len(train.classes) != BENCHMARKS[name]["classes"]:
        raise ValueError(f"{spec} has {len(train.classes)} classes; pre-training on some of them needs the "
                         f"{BENCHMARKS[name]['classes']} of {name}")
    if name == "split-cifar100" and len(train.classes) != 100:
        raise ValueError(f"{spec} has {len(train.classes)} classes, split-cifar100 needs 100")
    if name == "split-cifar10" and len(train.classes) != 10:
        raise ValueError(f"{spec} has {len(train.classes)} classes, split-cifar10 needs 10")
    test = _subset(load_split(spec, "test", image_size), n_test, seed)
    if test.classes != train.classes:
        raise ValueError(f"{spec}: train and test classes differ")
    return _class_incremental(name, train, test, num_tasks, seed, shuffle_classes, spec, pretrain_classes)
