"""Labelled image datasets: one in memory (uint8 tensor) and one decoding its files on demand; seeded subsets.

Both classes share one small interface that streams rely on: ``len()``, ``labels`` (int64, all samples),
``classes``, ``name``, ``image_shape``, ``get_batch(indices) -> (uint8 images, int64 labels)`` and
``subset(indices)``. Images stay uint8 (4x smaller than float); a stream converts each batch to float.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from streams.folder_io import FileTree, decode_files, decode_image

Indices = Union[Tensor, np.ndarray, Sequence[int], range]


def as_index_tensor(indices: Indices, length: int) -> Tensor:
    """Indices as an int64 tensor, checked against the dataset length."""
    index = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices)
    if index.dtype == torch.bool:
        raise TypeError("boolean masks are not indices; pass integer positions")
    index = index.to(torch.int64).reshape(-1)
    if index.numel() and (int(index.min()) < -length or int(index.max()) >= length):
        raise IndexError(f"index out of range for a dataset of {length} images")
    return index


def _check_labels(labels: Tensor, n: int, classes: Sequence[str]) -> None:
    if labels.dtype != torch.int64 or labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be int64 of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise ValueError(f"labels must lie in 0..{len(classes) - 1} (one per class name)")


@dataclass(eq=False)
class ImageDataset:
    """Images in memory: ``images`` uint8 (N, C, H, W) on the CPU, ``labels`` int64 (N,), class names in label
    order, and a name used in reports."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        self.classes = list(self.classes)
        _check_labels(self.labels, self.images.shape[0], self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def get_batch(self, indices: Indices) -> tuple[Tensor, Tensor]:
        """uint8 images (B, C, H, W) and int64 labels (B,) at the given positions."""
        index = as_index_tensor(indices, len(self))
        return self.images[index], self.labels[index]

    def subset(self, indices: Indices, name: str | None = None) -> "ImageDataset":
        index = as_index_tensor(indices, len(self))
        return ImageDataset(self.images[index], self.labels[index], list(self.classes), name or self.name)


@dataclass(eq=False)
class LazyImageDataset:
    """Images decoded from their files on demand in ``get_batch`` (for folders too large to hold decoded, e.g.
    ImageNet-C). ``size`` resizes every image (shorter side, centre crop); ``cache_items`` > 0 keeps that many
    decoded images in an LRU cache."""

    tree: FileTree
    files: list[str]
    labels: Tensor
    classes: list[str]
    name: str = "dataset"
    size: int | None = None
    cache_items: int = 0
    _cache: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False, compare=False)
    _shape: tuple[int, int, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.files, self.classes = list(self.files), list(self.classes)
        _check_labels(self.labels, len(self.files), self.classes)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            if self.size is not None:
                self._shape = (3, self.size, self.size)
            elif self.files:
                self._shape = tuple(self._decode(0).shape)  # type: ignore[assignment]
            else:
                raise ValueError(f"{self.name}: an empty dataset has no image shape")
        return self._shape  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _decode(self, i: int) -> Tensor:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        name = self.files[i]
        image = torch.from_numpy(decode_image(self.tree.read(name), self.tree.describe(name), self.size)
                                 .transpose(2, 0, 1).copy())
        if self.cache_items > 0:
            self._cache[i] = image
            if len(self._cache) > self.cache_items:
                self._cache.popitem(last=False)
        return image

    def get_batch(self, indices: Indices) -> tuple[Tensor, Tensor]:
        """Decode the images at the given positions: uint8 (B, C, H, W) and int64 labels (B,)."""
        index = as_index_tensor(indices, len(self)) % max(len(self), 1)
        images = [self._decode(int(i)) for i in index]
        shape = self.image_shape
        for i, image in zip(index.tolist(), images):
            if tuple(image.shape) != shape:
                raise ValueError(f"{self.tree.describe(self.files[i])} has shape {tuple(image.shape)}, expected "
                                 f"{shape}: pass size=<pixels> to the loader to resize every image")
        batch = torch.stack(images) if images else torch.zeros((0,) + shape, dtype=torch.uint8)
        return batch, self.labels[index]

    def subset(self, indices: Indices, name: str | None = None) -> "LazyImageDataset":
        index = as_index_tensor(indices, len(self)) % max(len(self), 1)
        return LazyImageDataset(self.tree, [self.files[i] for i in index.tolist()], self.labels[index],
                                list(self.classes), name or self.name, self.size, self.cache_items)

    def materialize(self, progress: bool | None = None) -> ImageDataset:
        """Decode everything into an in-memory :class:`ImageDataset`."""
        images = decode_files(self.tree, self.files, self.size, progress)
        return ImageDataset(torch.from_numpy(images), self.labels.clone(), list(self.classes), self.name)


AnyImageDataset = Union[ImageDataset, LazyImageDataset]


def _generator(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed & 0xFFFFFFFFFFFFFFFF))


def random_subset(dataset: AnyImageDataset, n: int, seed: int = 0) -> AnyImageDataset:
    """``n`` images drawn uniformly without replacement (seeded), kept in dataset order."""
    if not 0 <= n <= len(dataset):
        raise ValueError(f"n must lie in 0..{len(dataset)} (the dataset size), got {n}")
    chosen = np.sort(_generator(seed).choice(len(dataset), size=n, replace=False))
    return dataset.subset(chosen)


def class_balanced_subset(dataset: AnyImageDataset, n: int, seed: int = 0) -> AnyImageDataset:
    """``n`` images with class counts as equal as possible (seeded); a class with too few images gives all it has
    and the others fill up. Kept in dataset order."""
    if not 0 <= n <= len(dataset):
        raise ValueError(f"n must lie in 0..{len(dataset)} (the dataset size), got {n}")
    rng = _generator(seed)
    labels = dataset.labels.numpy()
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in rng.permutation(np.unique(labels))]
    longest = max((len(p) for p in per_class), default=0)
    # round robin over classes (class order seeded): the first n picks are balanced
    padded = np.full((len(per_class), longest), -1, dtype=np.int64)
    for row, ids in enumerate(per_class):
        padded[row, :len(ids)] = ids
    picks = padded.T.reshape(-1)
    chosen = np.sort(picks[picks >= 0][:n])
    return dataset.subset(chosen)
