"""The frost photographs of the ``frost`` corruption: where to find them, and decoded copies cached in memory.

Looked up in this order: the ``frost_dir`` argument, the ``TTA_FROST_DIR`` environment variable, the ``frost``
folder of an installed ``imagecorruptions`` package (its wheel ships the six files). The reference reads them
with ``cv2.imread`` (alpha dropped) and, for 32 / 64 px images, shrinks them with ``cv2.resize(fx=fy=scale)``
(INTER_LINEAR, uint8 result); we decode with Pillow (``convert("RGB")`` also drops alpha) and resize with
``corruption_ops.resize_linear_cv2`` rounded to 8 bits.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from streams.corruption_ops import resize_linear_cv2
from tta._extras import install_hint

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
# The reference draws np.random.randint(5): only frost1..frost5 are ever used (frost6 ships but is never picked).
FROST_USED = 5
FROST_ENV = "TTA_FROST_DIR"


def _package_frost_dir() -> Path | None:
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "frost"


def find_frost_dir(frost_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the frost photographs (argument, then ``$TTA_FROST_DIR``, then ``imagecorruptions``)."""
    candidates: list[tuple[str, Path]] = []
    if frost_dir is not None:
        candidates.append(("frost_dir argument", Path(frost_dir).expanduser()))
    elif os.environ.get(FROST_ENV):
        candidates.append((f"${FROST_ENV}", Path(os.environ[FROST_ENV]).expanduser()))
    else:
        package_dir = _package_frost_dir()
        if package_dir is not None:
            candidates.append(("imagecorruptions package", package_dir))
    for source, folder in candidates:
        missing = [name for name in FROST_FILES[:FROST_USED] if not (folder / name).is_file()]
        if not missing:
            return folder
        raise FileNotFoundError(f"frost photographs missing in {folder} (from the {source}): {', '.join(missing)}; "
                                f"expected {', '.join(FROST_FILES[:FROST_USED])}")
    raise FileNotFoundError(
        "the frost corruption needs the frost photographs (frost1.png ... frost5.jpg of ImageNet-C); supply them "
        f"with corrupt(..., frost_dir=PATH), or set the environment variable {FROST_ENV}=PATH, or "
        f"`{install_hint('imagecorruptions')}` (installs imagecorruptions, whose wheel ships them)")


@lru_cache(maxsize=8)
def _load(folder: str, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    photos = []
    for name in FROST_FILES[:FROST_USED]:
        with Image.open(Path(folder) / name) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        photo = torch.from_numpy(array.copy()).permute(2, 0, 1)
        if scale != 1.0:
            resized = resize_linear_cv2(photo.to(torch.float64), scale)
            photo = torch.floor(resized + 0.5).clamp(0, 255).to(torch.uint8)
        photos.append(photo)
    sizes = torch.tensor([p.shape[1:] for p in photos])
    stacked = torch.zeros(len(photos), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()), dtype=torch.uint8)
    for i, photo in enumerate(photos):
        stacked[i, :, :photo.shape[1], :photo.shape[2]] = photo
    return stacked, sizes


def frost_photos(frost_dir: str | os.PathLike | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The five usable photos resized by ``scale``: uint8 (5, 3, Hmax, Wmax) zero-padded, and their (5, 2)
    sizes. Decoded once per folder and scale, then served from memory."""
    return _load(str(find_frost_dir(frost_dir).resolve()), float(scale))
