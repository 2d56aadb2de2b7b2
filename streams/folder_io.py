"""ImageFolder trees in a folder or a zip file: find the images, decode them, cache the decoded pixels.

An ImageFolder tree is ``[<wrapper>/][<split>/]<class>/.../<image>``. Class folder names sorted alphabetically
give the label order (as torchvision's ``ImageFolder``). A folder and a zip file are read by the same code
(the zip with ``zipfile`` directly, members decoded with PIL), so a dataset can stay zipped on disk.
Decoding is the slow part, so :func:`decode_folder` keeps the decoded uint8 array in a per-user cache
(``~/.cache/tta-runtime``, or ``$TTA_CACHE_DIR``) keyed by the source's path, size and modification time.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Top-level folder names recognised as splits when no split is asked for.
KNOWN_SPLITS = ("train", "test", "val", "valid", "validation")
_CACHE_VERSION = 1


class DataFormatError(ValueError):
    """A data file or folder exists but does not hold what its layout promises (truncated, corrupted, wrong)."""


def cache_root() -> Path:
    """The per-user cache folder of decoded datasets: ``$TTA_CACHE_DIR`` or ``~/.cache/tta-runtime``."""
    return Path(os.environ.get("TTA_CACHE_DIR") or Path.home() / ".cache" / "tta-runtime")


# ----------------------------------------------------------------------------------------------- file trees
class FileTree:
    """Read access to the files of a folder or of a zip file, by posix path relative to its root."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise FileNotFoundError(f"no such file or folder: {self.path}")
        self.is_zip = self.path.is_file()
        self._zip: zipfile.ZipFile | None = None  # opened on first use

    def _open_zip(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise DataFormatError(
                    f"{self.path}: not a readable zip file ({error}); it may be truncated or corrupted") from error
        return self._zip

    def files(self) -> list[str]:
        """All regular files, as posix paths relative to the root, sorted."""
        if self.is_zip:
            names = [info.filename for info in self._open_zip().infolist() if not info.is_dir()]
        else:
            names = []
            for folder, dirs, filenames in os.walk(self.path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel = Path(folder).relative_to(self.path)
                names.extend((rel / f).as_posix() for f in filenames)
        return sorted(names)

    def read(self, name: str) -> bytes:
        """The bytes of one file; a clear error naming the file when it cannot be read."""
        try:
            if self.is_zip:
                return self._open_zip().read(name)
            return (self.path / name).read_bytes()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as error:
            raise DataFormatError(f"cannot read {self.describe(name)}: {error}") from error

    def describe(self, name: str) -> str:
        return f"{self.path}:{name}" if self.is_zip else str(self.path / name)

    def fingerprint(self, names: Sequence[str] = ()) -> str:
        """Changes whenever the data may have changed: the zip's size and mtime, or for a folder every listed
        file's size and mtime."""
        if self.is_zip:
            stat = self.path.stat()
            parts = [str(self.path), str(stat.st_size), str(stat.st_mtime_ns)]
        else:
            parts = [str(self.path)]
            for name in names:
                stat = (self.path / name).stat()
                parts.append(f"{name}|{stat.st_size}|{stat.st_mtime_ns}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self) -> dict:  # a zip handle does not pickle; it is reopened on first use
        state = dict(self.__dict__)
        state["_zip"] = None
        return state


# ------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class FolderIndex:
    """The images of one ImageFolder tree (one split): member names, labels, class names."""

    tree: FileTree
    files: tuple[str, ...]
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    split: str | None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible(parts: tuple[str, ...]) -> bool:
    return not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _top_dirs(paths: list[tuple[str, ...]]) -> set[str]:
    return {p[0] for p in paths if len(p) >= 2}


def _looks_split(paths: list[tuple[str, ...]]) -> bool:
    tops = _top_dirs(paths)
    return bool(tops) and tops <= set(KNOWN_SPLITS) and all(len(p) >= 3 for p in paths)


def list_splits(path: str | os.PathLike) -> list[str]:
    """The split folders (train/test/...) of an ImageFolder tree; empty for a plain class layout."""
    tree = FileTree(path)
    paths, _ = _image_paths(tree)
    if not paths:
        raise DataFormatError(_no_images(tree))
    return sorted(_top_dirs(paths)) if _looks_split(paths) else []


def _no_images(tree: FileTree) -> str:
    return (f"{tree.path}: no images found (looked for <class>/<image> or <split>/<class>/<image> with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)})")


def _image_paths(tree: FileTree) -> tuple[list[tuple[str, ...]], str]:
    """Image paths as parts, with a single wrapper folder around a split layout stripped (returned as prefix)."""
    paths = [tuple(part for part in n.split("/") if part) for n in tree.files() if _is_image(n)]
    paths = [p for p in paths if p and _visible(p)]
    prefix = ""
    tops = _top_dirs(paths)
    if len(tops) == 1 and all(len(p) >= 4 for p in paths):
        inner = [p[1:] for p in paths]
        if _looks_split(inner):
            prefix, paths = paths[0][0] + "/", inner
    return paths, prefix


def index_imagefolder(path: str | os.PathLike | FileTree, split: str | None = None) -> FolderIndex:
    """Find the images of an ImageFolder tree (folder or zip); ``split`` selects a top-level split folder."""
    tree = path if isinstance(path, FileTree) else FileTree(path)
    paths, prefix = _image_paths(tree)
    if not paths:
        raise DataFormatError(_no_images(tree))
    splits = sorted(_top_dirs(paths)) if _looks_split(paths) else []
    if split is not None:
        inside = [p[1:] for p in paths if len(p) >= 3 and p[0] == split]
        if not inside:
            available = ", ".join(splits) if splits else "none (the tree is a plain <class>/<image> layout)"
            raise ValueError(f"{tree.path}: split {split!r} not found; available splits: {available}")
        paths, prefix = inside, prefix + split + "/"
    elif splits:
        raise ValueError(f"{tree.path} holds the splits {', '.join(splits)}: pass split=<one of them>")
    paths = [p for p in paths if len(p) >= 2]
    if not paths:
        raise DataFormatError(f"{tree.path}: images must lie in class folders (<class>/<image>)")
    classes = sorted({p[0] for p in paths})
    lookup = {name: i for i, name in enumerate(classes)}
    paths.sort(key=lambda p: (lookup[p[0]], p))
    files = tuple(prefix + "/".join(p) for p in paths)
    labels = np.fromiter((lookup[p[0]] for p in paths), dtype=np.int64, count=len(paths))
    return FolderIndex(tree, files, labels, tuple(classes), split)


# ------------------------------------------------------------------------------------------------ decoding
def decode_image(data: bytes, where: str, size: int | None = None) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array (H, W, 3); with ``size``: shorter side to size, centre crop."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = _resize_center_crop(rgb, size)
            return np.array(rgb, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataFormatError(f"cannot decode image {where}: {error}") from error


def _resize_center_crop(image, size: int):
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(new, Image.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_files(tree: FileTree, files: Sequence[str], size: int | None = None,
                 progress: bool | None = None) -> np.ndarray:
    """Decode files to one uint8 array (N, 3, H, W); every image must have the same size (or pass ``size``)."""
    from tqdm.auto import tqdm

    if not files:
        return np.zeros((0, 3, size or 0, size or 0), dtype=np.uint8)
    first = decode_image(tree.read(files[0]), tree.describe(files[0]), size)
    out = np.empty((len(files), 3) + first.shape[:2], dtype=np.uint8)
    out[0] = first.transpose(2, 0, 1)
    disable = None if progress is None else not progress
    for i in tqdm(range(1, len(files)), desc=f"decoding {tree.path.name}", unit="img", disable=disable,
                  leave=False, mininterval=1.0):
        image = decode_image(tree.read(files[i]), tree.describe(files[i]), size)
        if image.shape != first.shape:
            raise DataFormatError(
                f"{tree.describe(files[i])} is {image.shape[1]}x{image.shape[0]} but {files[0]} is "
                f"{first.shape[1]}x{first.shape[0]}: pass size=<pixels> to resize every image to one size")
        out[i] = image.transpose(2, 0, 1)
    return out


# ------------------------------------------------------------------------------------------------- caching
@dataclass(frozen=True)
class DecodedFolder:
    """An ImageFolder tree decoded into memory: images (N, 3, H, W) uint8, labels int64, names, class names."""

    images: np.ndarray
    labels: np.ndarray
    files: tuple[str, ...]
    classes: tuple[str, ...]


def _cache_file(tree: FileTree, split: str | None, size: int | None, files: Sequence[str]) -> Path:
    key = json.dumps({"v": _CACHE_VERSION, "path": str(tree.path), "split": split, "size": size,
                      "fingerprint": tree.fingerprint(files)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in tree.path.name)
    return cache_root() / "imagefolder" / f"{stem}-{split or 'all'}-{digest}.npz"


def _read_cache(path: Path) -> DecodedFolder | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            decoded = DecodedFolder(stored["images"], stored["labels"], tuple(stored["files"].tolist()),
                                    tuple(stored["classes"].tolist()))
    except Exception as error:  # a damaged cache file is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache file {path}: {error}", stacklevel=3)
        return None
    if decoded.images.ndim != 4 or not len(decoded.images) == len(decoded.labels) == len(decoded.files):
        return None
    return decoded


def _write_cache(path: Path, decoded: DecodedFolder) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, images=decoded.images, labels=decoded.labels, files=np.array(decoded.files),
                     classes=np.array(decoded.classes))
        os.replace(tmp, path)
    except OSError as error:
        warnings.warn(f"could not write the decoded-image cache {path}: {error}", stacklevel=3)
        tmp.unlink(missing_ok=True)


def decode_folder(path: str | os.PathLike, split: str | None = None, size: int | None = None, cache: bool = True,
                  progress: bool | None = None) -> DecodedFolder:
    """Decode a whole ImageFolder tree, through the per-user cache. For a zip the cache key is its path, size,
    mtime, the split and ``size``, so a cache hit does not even read the zip's directory; for a folder the key
    covers every image file's size and mtime."""
    tree = FileTree(path)
    index = None
    cache_path = None
    if cache:
        if not tree.is_zip:
            index = index_imagefolder(tree, split)
        cache_path = _cache_file(tree, split, size, index.files if index else ())
        hit = _read_cache(cache_path)
        if hit is not None:
            return hit
    index = index or index_imagefolder(tree, split)
    images = decode_files(tree, index.files, size, progress)
    tree.close()
    decoded = DecodedFolder(images, index.labels, index.files, index.classes)
    if cache_path is not None:
        _write_cache(cache_path, decoded)
    return decoded
