"""Loaders for the data a user really has on disk, each returning an :class:`ImageDataset` (or its lazy variant).

- ``load_imagefolder``: an ImageFolder tree as a folder or a .zip (decoded once, cached per user);
- ``load_cifar``: the official CIFAR-10/100 python pickles (optionally downloaded with torchvision);
- ``load_digits``: scikit-learn's embedded 8x8 digits, upscaled to RGB (the no-download default);
- ``load_cifar_c``: the published CIFAR-10-C / CIFAR-100-C .npy layout (also what ``tta make-c`` writes);
- ``load_imagenet_c``: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``, decoded lazily;
- ``load_domains``: one ImageFolder per domain (PACS, Office-Home, DomainNet), class lists checked;
- ``load_dataset``: picks the right loader for a spec string ("digits", a .zip, a folder).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from streams.cifar_io import (CIFAR_LAYOUTS, CORRUPTED_FOLDERS, DEFAULT_CLASSES, find_cifar_folder,
                              find_corrupted_folder, read_cifar_python, read_class_names, read_corrupted)
from streams.folder_io import DataFormatError, decode_folder, index_imagefolder, list_splits
from streams.image_dataset import (AnyImageDataset, ImageDataset, LazyImageDataset, class_balanced_subset,
                                   random_subset)
from tta._extras import require

__all__ = [
    "AnyImageDataset", "DataFormatError", "ImageDataset", "LazyImageDataset", "class_balanced_subset",
    "random_subset", "load_imagefolder", "load_cifar", "load_digits", "load_cifar_c", "load_imagenet_c",
    "load_domains", "load_dataset",
]

PathLike = str | os.PathLike


def load_imagefolder(path: PathLike, split: str | None = None, *, size: int | None = None, lazy: bool = False,
                     cache: bool = True, cache_items: int = 0, name: str | None = None,
                     progress: bool | None = None) -> AnyImageDataset:
    """An ImageFolder tree (``<class>/<image>``, optionally under ``<split>/``) given as a folder or a .zip file.

    Class names sorted alphabetically give the labels (folders without images are not classes; a single wrapper
    folder around split folders, as left by zipping a folder, is skipped). ``split`` picks a top-level split folder (an error lists
    the available ones). Images must share one size unless ``size`` is given (shorter side resized to ``size``,
    then a centre crop). The decoded uint8 tensor is cached under ``~/.cache/tta-runtime`` (keyed by path, size,
    mtime and split) unless ``cache=False``; ``lazy=True`` decodes in ``get_batch`` instead (large folders).
    """
    label = name or _default_name(Path(path).expanduser().resolve(), split)
    if lazy:
        index = index_imagefolder(path, split)
        return LazyImageDataset(index.tree, list(index.files), torch.from_numpy(index.labels), list(index.classes),
                                label, size, cache_items)
    decoded = decode_folder(path, split, size=size, cache=cache, progress=progress)
    return ImageDataset(torch.from_numpy(decoded.images), torch.from_numpy(decoded.labels), list(decoded.classes),
                        label)


def _default_name(path: Path, split: str | None) -> str:
    stem = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
    return f"{stem}/{split}" if split else stem


def load_cifar(root: PathLike, name: str = "cifar10", split: str = "test", download: bool = False) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the official python layout (``<root>/cifar-10-batches-py`` or
    ``<root>/cifar-100-python``; ``root`` may also be that folder itself). ``download=True`` fetches the archive
    with torchvision first when the folder is absent."""
    if name not in CIFAR_LAYOUTS:
        raise ValueError(f"name must be one of {', '.join(CIFAR_LAYOUTS)}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    folder = find_cifar_folder(root, name)
    if folder is None and download:
        _download_cifar(root, name, split)
        folder = find_cifar_folder(root, name)
    if folder is None:
        expected = root / CIFAR_LAYOUTS[name][0]
        files = ", ".join(CIFAR_LAYOUTS[name][1][:1] + CIFAR_LAYOUTS[name][2])
        raise FileNotFoundError(f"{name} not found: expected the python layout {expected}/ (files such as {files}); "
                                f"pass download=True to fetch it")
    images, labels, classes = read_cifar_python(folder, name, split)
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, f"{name}/{split}")


def _download_cifar(root: Path, name: str, split: str) -> None:
    """Fetch the official archive with torchvision (it verifies the checksum and unpacks it under ``root``)."""
    import torchvision.datasets

    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    dataset_class(root=str(root), train=split == "train", download=True)


def load_digits(split: str = "test", size: int = 32, seed: int = 0, test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's embedded handwritten digits (1797 images, 8x8 grey, values 0..16) as RGB uint8.

    Values are scaled to 0..255, resized to ``size`` x ``size`` (bilinear) and replicated to 3 channels. The
    train/test split is stratified by class and seeded; ``split="all"`` returns every image.
    """
    train_test_split = require("sklearn.model_selection", "the digits dataset").train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    raw_images, raw_labels = _digits_arrays()
    grey = torch.from_numpy(raw_images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    if size != grey.shape[-1]:
        grey = torch.nn.functional.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
    images = grey.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(raw_labels.astype(np.int64))
    classes = [str(c) for c in range(10)]
    if split == "all":
        return ImageDataset(images, labels, classes, "digits")
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=labels.numpy())
    chosen = np.sort(test_idx if split == "test" else train_idx)
    return ImageDataset(images[chosen], labels[chosen], classes, f"digits/{split}")


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (read from its bundled file once per process; callers copy)."""
    bunch = require("sklearn.datasets", "the digits dataset").load_digits()
    return bunch.images, bunch.target


def load_cifar_c(root: PathLike, corruption: str, severity: int, name: str = "cifar10",
                 n: int | None = None) -> ImageDataset:
    """One corruption and severity of the published CIFAR-10-C / CIFAR-100-C layout: ``<root>/<corruption>.npy``
    (5*N, H, W, 3) uint8 with severities 1..5 stacked in blocks of N (N = 10000 in the published files) and
    ``<root>/labels.npy``; ``<root>/CIFAR-10-C/`` or ``<root>/CIFAR-100-C/`` (robustbench layout) are accepted
    too. Class names: ``<root>/classes.txt`` when present (written by ``tta make-c``), else those of ``name``
    (CIFAR-100's when the labels go beyond 9). ``n`` keeps the first
    ``n`` images of the block (as robustbench does). Files are memory-mapped, so only that block is read."""
    if name not in CORRUPTED_FOLDERS:
        raise ValueError(f"name must be one of {', '.join(CORRUPTED_FOLDERS)}, got {name!r}")
    folder = find_corrupted_folder(Path(root).expanduser(), name, corruption)
    images, labels = read_corrupted(folder, corruption, int(severity), n)
    classes = read_class_names(folder) or list(DEFAULT_CLASSES[name])
    if labels.size and int(labels.max()) >= len(classes):  # e.g. CIFAR-100-C read with the default name
        fits = [list(c) for c in DEFAULT_CLASSES.values() if int(labels.max()) < len(c)]
        classes = fits[0] if fits else [str(i) for i in range(int(labels.max()) + 1)]
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, f"{corruption}-{severity}")


def load_imagenet_c(root: PathLike, corruption: str, severity: int, *, size: int | None = None,
                    cache_items: int = 0) -> LazyImageDataset:
    """One corruption and severity of ImageNet-C (``<root>/<corruption>/<severity>/<wnid>/*.JPEG``; also under
    ``<root>/ImageNet-C/``), decoded lazily. Labels follow the sorted wnids (the standard ImageNet order)."""
    root = Path(root).expanduser()
    candidates = [root / corruption / str(severity), root / "ImageNet-C" / corruption / str(severity)]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"ImageNet-C {corruption} severity {severity} not found (looked for "
                                f"{' and '.join(map(str, candidates))}); expected "
                                f"<root>/<corruption>/<severity>/<wnid>/*.JPEG")
    dataset = load_imagefolder(folder, lazy=True, size=size, cache_items=cache_items, name=f"{corruption}-{severity}")
    assert isinstance(dataset, LazyImageDataset)
    return dataset


def load_domains(root: PathLike, domains: Sequence[str] | None = None, *, size: int | None = None,
                 lazy: bool = False, cache: bool = True) -> dict[str, AnyImageDataset]:
    """One ImageFolder per domain, ``<root>/<domain>/<class>/*`` (PACS, Office-Home, DomainNet). ``domains=None``
    takes every subfolder, sorted. Every domain must have the same class folders (same labels)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root} (expected <root>/<domain>/<class>/<image>)")
    available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = list(available if domains is None else domains)
    missing = [d for d in names if d not in available]
    if missing or not names:
        raise FileNotFoundError(f"{root}: domains {missing or '(none)'} not found; available: {', '.join(available)}")
    loaded = {d: load_imagefolder(root / d, size=size, lazy=lazy, cache=cache, name=d) for d in names}
    reference = names[0]
    for domain, dataset in loaded.items():
        if dataset.classes != loaded[reference].classes:
            only_ref = sorted(set(loaded[reference].classes) - set(dataset.classes))
            only_here = sorted(set(dataset.classes) - set(loaded[reference].classes))
            raise DataFormatError(f"{root}: the class folders of {domain!r} differ from those of {reference!r} "
                                  f"(missing: {only_ref}, extra: {only_here}); labels would not agree")
    return loaded


def load_dataset(spec: PathLike, split: str = "test", **options) -> AnyImageDataset:
    """Load a dataset from a spec: ``"digits"``; a .zip or folder ImageFolder tree (``split`` is used when the
    tree has split folders); a folder holding ``cifar-10-batches-py`` or ``cifar-100-python``."""
    if str(spec) == "digits":
        return load_digits(split=split, **options)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset {str(spec)!r} not found: give 'digits', an ImageFolder .zip or folder, or "
                                f"a folder holding cifar-10-batches-py / cifar-100-python")
    if path.is_dir():
        for name in CIFAR_LAYOUTS:
            if find_cifar_folder(path, name) is not None:
                return load_cifar(path, name=name, split=split)
    if path.is_dir() or path.suffix.lower() == ".zip":
        try:
            splits = list_splits(path)
        except DataFormatError as error:
            raise DataFormatError(f"{error}; nor is it a CIFAR python folder (cifar-10-batches-py, "
                                  f"cifar-100-python)") from error
        return load_imagefolder(path, split=split if splits else None, **options)
    raise ValueError(f"cannot load {path}: expected 'digits', a .zip ImageFolder, an ImageFolder folder "
                     f"([<split>/]<class>/<image>) or a folder with cifar-10-batches-py / cifar-100-python")
