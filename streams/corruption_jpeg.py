"""JPEG round trip with Pillow, the codec the reference itself uses (``PIL.Image.save(..., 'JPEG', quality=q)``).

torchvision's ``encode_jpeg``/``decode_jpeg`` would keep the work in torch, but the torchvision wheel pinned here is
a CUDA build whose image extension does not load next to the CPU build of torch ("Couldn't load the image
extension"), so Pillow (libjpeg) is the route on every device. Each image is encoded on its own (JPEG blocks and
chroma upsampling at the borders make a shared mosaic differ from per-image files), with Pillow's defaults as in
the reference: baseline, 4:2:0 chroma subsampling, standard tables scaled by ``quality``.
"""
from __future__ import annotations

import io

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8 on the CPU, rounded to the nearest level."""
    return (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous().numpy()


def jpeg_roundtrip_uint8(images: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode every (H, W, 3) uint8 image of ``images`` at ``quality``."""
    from PIL import Image, JpegImagePlugin

    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image, "RGB").save(buffer, "JPEG", quality=int(quality))
        buffer.seek(0)
        decoded = JpegImagePlugin.JpegImageFile(buffer)  # the JPEG reader directly, skipping format sniffing
        decoded.load()
        out[i] = np.asarray(decoded.convert("RGB") if decoded.mode != "RGB" else decoded)
    return out


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Every image of ``x`` (N, 3, H, W) in [0, 1] quantised to 8 bits, JPEG-coded at ``quality`` and decoded;
    returned in [0, 1] on ``x``'s device and dtype."""
    decoded = jpeg_roundtrip_uint8(to_uint8(x), quality)
    return torch.from_numpy(decoded).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0
