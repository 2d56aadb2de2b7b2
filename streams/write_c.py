"""``tta make-c``: write a CIFAR-10-C-layout folder of corrupted images from any dataset ``load_dataset`` reads.

Layout (the one the published CIFAR-10-C files and robustbench's ``load_cifar10c`` use):
``<out>/<corruption>.npy`` (5*N, H, W, 3) uint8 with severities 1..5 stacked in blocks of N, and
``<out>/labels.npy`` (5*N,) uint8 (int64 when there are more than 256 classes), the N labels repeated per
severity. Extra files: ``classes.txt`` (class names, one per line) and ``make_c.json`` (the settings, checked on
resume). The N images are a seeded permutation of the source (a seeded random subset when ``--n-images`` is
given), so a class-sorted source never gives class-sorted files. robustbench's loader assumes N = 10000 per
severity; with another N only severity 1 lines up there (``streams.load_cifar_c`` reads any N).

Every file is written to a temporary name and renamed when complete; corruptions already written are skipped,
so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from streams.image_dataset import AnyImageDataset
from streams.orders import derive_seed, generator
from streams.protocols import SEVERITIES, corruption_names

MANIFEST = "make_c.json"
ROBUSTBENCH_BLOCK = 10000


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.replace(tmp, path)


def _complete(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return array.shape == shape and array.dtype == np.uint8


def _to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != manifest:
            changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
            raise ValueError(f"{out} was written with other settings ({', '.join(changed)} differ): use a new --out "
                             f"folder or the same settings to resume")
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)


def write_c(dataset: AnyImageDataset, out: str | os.PathLike, corruptions: str | Sequence[str] = "all",
            n_images: int | None = None, seed: int = 0, batch_size: int = 500,
            corrupt_fn: Callable[..., torch.Tensor] | None = None, progress: bool | None = None) -> Path:
    """Write ``dataset`` corrupted by each corruption at severities 1..5 in the CIFAR-10-C layout under ``out``.

    The corruption seed of each chunk of ``batch_size`` images is derived from ``seed``, the corruption, the
    severity and the chunk number. Returns the output folder.
    """
    from tqdm.auto import tqdm

    if corrupt_fn is None:
        from streams.corruptions import corrupt as corrupt_fn
    names = corruption_names(corruptions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_images is not None and not 1 <= n_images:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    channels, height, width = dataset.image_shape
    if channels != 3:
        raise ValueError(f"the CIFAR-10-C layout holds RGB images; {dataset.name} has {channels} channels")
    order = generator(seed, "make-c").permutation(len(dataset))[:n_images]
    n = len(order)
    out = Path(out).expanduser()
    _check_manifest(out, {"source": dataset.name, "n_images": n, "seed": seed, "batch_size": batch_size,
                          "image_shape": [channels, height, width], "classes": list(dataset.classes)})
    labels = dataset.labels[torch.from_numpy(order)].numpy()
    label_dtype = np.uint8 if len(dataset.classes) <= 256 else np.int64
    labels_path = out / "labels.npy"
    stacked = np.tile(labels.astype(label_dtype), len(SEVERITIES))
    if not (labels_path.is_file() and np.array_equal(np.load(labels_path, allow_pickle=False), stacked)):
        _atomic_save(labels_path, stacked)
    classes_path = out / "classes.txt"
    if not classes_path.is_file():
        tmp = classes_path.with_name(f"classes.txt.tmp{os.getpid()}")
        tmp.write_text("".join(f"{c}\n" for c in dataset.classes), encoding="utf-8")
        os.replace(tmp, classes_path)

    shape = (len(SEVERITIES) * n, height, width, 3)
    todo = [c for c in names if not _complete(out / f"{c}.npy", shape)]
    chunks = range(0, n, batch_size)
    bar = tqdm(total=len(todo) * len(SEVERITIES) * len(chunks), unit="batch", disable=None if progress is None
               else not progress, desc="make-c")
    for corruption in todo:
        for stale in out.glob(f"{corruption}.npy.tmp*"):
            stale.unlink(missing_ok=True)
        target = out / f"{corruption}.npy"
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        for block, severity in enumerate(SEVERITIES):
            bar.set_description(f"{corruption} {severity}")
            for number, start in enumerate(chunks):
                rows = order[start:start + batch_size]
                images, _ = dataset.get_batch(torch.from_numpy(rows))
                x = images.to(torch.float32).div_(255.0)
                seed_here = derive_seed(seed, "make-c", corruption, severity, number)
                corrupted = corrupt_fn(x, corruption, severity, seed=seed_here)
                array[block * n + start:block * n + start + len(rows)] = _to_uint8_hwc(corrupted)
                bar.update(1)
        array.flush()
        del array
        os.replace(tmp, target)
    bar.close()
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits",
                        help="'digits', an ImageFolder folder or .zip, or a folder with cifar-10-batches-py")
    parser.add_argument("--split", default="test", help="split of the source data (default: test)")
    parser.add_argument("--corruptions", default="all",
                        help="'all' (15 benchmark corruptions), 'extra' (4 validation ones) or name,name,...")
    parser.add_argument("--n-images", type=int, default=None,
                        help="seeded random subset of this many source images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order, subset and corruptions")
    parser.add_argument("--batch-size", type=int, default=500, help="images corrupted per call")
    parser.add_argument("--out", required=True, help="output folder (<out>/<corruption>.npy, <out>/labels.npy)")
    parser.add_argument("--frost-dir", default=None,
                        help="folder of the frost photographs (default: $TTA_FROST_DIR or the imagecorruptions package)")


def run(args: argparse.Namespace) -> int:
    import functools
    import sys

    from streams.corruptions import corrupt
    from streams.datasets import load_dataset

    try:
        names = corruption_names(args.corruptions)
        corrupt_fn = corrupt if args.frost_dir is None else functools.partial(corrupt, frost_dir=args.frost_dir)
        if "frost" in names:  # fail before hours of work, not at the frost corruption
            from streams.corruption_photos import find_frost_dir

            find_frost_dir(args.frost_dir)
        dataset = load_dataset(args.data, split=args.split)
        out = write_c(dataset, args.out, corruptions=names, n_images=args.n_images, seed=args.seed,
                      batch_size=args.batch_size, corrupt_fn=corrupt_fn)
    except (FileNotFoundError, ValueError) as error:
        print(f"tta make-c: error: {error}", file=sys.stderr)
        return 2
    n = min(len(dataset), args.n_images or len(dataset))
    note = "" if n == ROBUSTBENCH_BLOCK else (f" (robustbench's load_cifar10c assumes {ROBUSTBENCH_BLOCK} images per"
                                              f" severity; use streams.load_cifar_c for N={n})")
    print(f"wrote {out} ({n} images x 5 severities per corruption){note}")
    return 0
