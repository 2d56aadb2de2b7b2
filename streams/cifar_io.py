"""The CIFAR file formats: the python pickles (read with a restricted unpickler) and the CIFAR-10-C .npy layout.

The official ``cifar-10-batches-py`` / ``cifar-100-python`` files are Python-2 pickles of dicts holding numpy
arrays, lists and strings. Unpickling runs code named in the file, so :class:`SafeUnpickler` allows only the
few numpy reconstruction callables those files need; anything else is refused with an error.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from streams.folder_io import DataFormatError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100 fine labels: the official label order is alphabetical.
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)

# name -> (folder, training files, test files, label key, meta file, class-name key)
CIFAR_LAYOUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, str, str]] = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", "meta", "fine_label_names"),
}
DEFAULT_CLASSES = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES}
# Folder that the published corrupted sets unpack to (and that robustbench's loader expects).
CORRUPTED_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays; any other global is refused."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays are allowed)")
        if module == "numpy.core.multiarray":  # numpy 2 renamed the module; avoid its deprecation shim
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (bytes keys of Python-2 pickles are decoded)."""
    try:
        with open(path, "rb") as handle:
            value = SafeUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DataFormatError(f"{path}: not a readable CIFAR pickle ({error})") from error
    if not isinstance(value, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(value).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}


def _as_str(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def find_cifar_folder(root: Path, name: str) -> Path | None:
    """``root/<folder>`` or ``root`` itself when it is the CIFAR python folder; None when absent."""
    folder, train_files, test_files = CIFAR_LAYOUTS[name][:3]
    for candidate in (root / folder, root):
        if (candidate / test_files[0]).is_file() or (candidate / train_files[0]).is_file():
            return candidate
    return None


def read_cifar_python(folder: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, 3, 32, 32) uint8, labels int64 and class names from a CIFAR python folder."""
    _, train_files, test_files, label_key, meta_file, names_key = CIFAR_LAYOUTS[name]
    images, labels = [], []
    for filename in train_files if split == "train" else test_files:
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the {name} python folder is incomplete")
        batch = read_pickle(path)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        except KeyError as error:
            raise DataFormatError(f"{path}: missing key {error} (expected 'data' and {label_key!r})") from error
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != batch_labels.shape[0]:
            raise DataFormatError(f"{path}: data has shape {data.shape} for {batch_labels.shape[0]} labels, "
                                  f"expected (N, 3072)")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    classes = list(DEFAULT_CLASSES[name])
    if (folder / meta_file).is_file():
        meta = read_pickle(folder / meta_file)
        if names_key in meta:
            classes = [_as_str(c) for c in meta[names_key]]
    return np.concatenate(images), np.concatenate(labels), classes


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataFormatError(f"{path}: not a readable .npy file ({error}); it may be truncated") from error


def find_corrupted_folder(root: Path, name: str, corruption: str) -> Path:
    """``root``, ``root/CIFAR-10-C`` or ``root/CIFAR-100-C`` (robustbench layout; the one of ``name`` first): the
    folder holding ``<corruption>.npy``."""
    others = [folder for key, folder in CORRUPTED_FOLDERS.items() if key != name]
    candidates = (root, root / CORRUPTED_FOLDERS[name], *(root / folder for folder in others))
    for folder in candidates:
        if (folder / f"{corruption}.npy").is_file():
            return folder
    looked = " or ".join(str(folder / f"{corruption}.npy") for folder in candidates)
    raise FileNotFoundError(f"no {corruption}.npy found (looked for {looked}); expected the CIFAR-10-C layout "
                            f"<root>/<corruption>.npy (5*N, 32, 32, 3) uint8 plus <root>/labels.npy")


def read_corrupted(folder: Path, corruption: str, severity: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 3, H, W) uint8 and labels int64 of one severity block of a CIFAR-10-C-layout file."""
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must lie in 1..5, got {severity}")
    images_path, labels_path = folder / f"{corruption}.npy", folder / "labels.npy"
    images, labels = _load_npy(images_path), _load_npy(labels_path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] % 5:
        raise DataFormatError(f"{images_path}: shape {images.shape} {images.dtype}, expected (5*N, H, W, 3) uint8 "
                              f"(severities 1..5 stacked in blocks of N)")
    block = images.shape[0] // 5
    if labels.ndim != 1 or labels.shape[0] not in (block, 5 * block):
        raise DataFormatError(f"{labels_path}: shape {labels.shape}, expected ({5 * block},) or ({block},) to match "
                              f"{images_path.name} {images.shape}")
    count = block if n is None else n
    if not 0 <= count <= block:
        raise ValueError(f"n must lie in 0..{block} (images per severity), got {n}")
    start = (severity - 1) * block
    chosen = np.ascontiguousarray(images[start:start + count].transpose(0, 3, 1, 2))
    label_start = start if labels.shape[0] == 5 * block else 0
    return chosen, np.asarray(labels[label_start:label_start + count], dtype=np.int64)


def read_class_names(folder: Path) -> list[str] | None:
    """Class names from ``classes.txt`` (one per line, written by ``tta make-c``), if present."""
    path = folder / "classes.txt"
    if not path.is_file():
        return None
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]
