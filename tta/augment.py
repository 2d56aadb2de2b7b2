"""Image augmentations in plain PyTorch, on float images in [0, 1], for methods that adapt on augmented views.

Every random choice is drawn from a ``torch.Generator`` that the caller owns (CPU), so an adapter can restore its
augmentation stream bitwise on ``reset()``; the pixel work runs on the images' own device and dtype. Two families:

* :func:`consistency_augment`: the colour jitter + padded affine + flip used by ROID (and CoTTA, without its
  blur and noise) in the reference (mariodoebler/test-time-adaptation, ``get_tta_transforms``): one parameter draw
  per call, applied to the whole batch, as torchvision transforms applied to a batched tensor do.
* :func:`augmix_views`: MEMO's AugMix-style views of one image (Hendrycks et al. 2020's operations on PIL images in
  the reference; here on tensors, without PIL's uint8 rounding between operations).

The geometric operations sample bilinearly with ``grid_sample`` (zeros outside the image); the colour operations
follow torchvision's tensor arithmetic (grayscale weights 0.2989/0.587/0.114, clamping to [0, 1] after each
blend), so for given parameters they agree with ``torchvision.transforms.functional`` to rounding
(tests/test_method_roid.py checks it).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


# -- random draws (CPU generator, Python numbers) ----------------------------------------------------------------
def uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


# -- colour ------------------------------------------------------------------------------------------------------
def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(..., 1, H, W) luma of RGB images (ITU-R 601-2 weights, as torchvision); other channel counts: the mean."""
    if images.shape[-3] == 3:
        r, g, b = images.unbind(-3)
        return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)
    return images.mean(-3, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor | float, ratio: float) -> torch.Tensor:
    return (ratio * images + (1.0 - ratio) * other).clamp(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    return (images * factor).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend with the mean grey level of each image."""
    return _blend(images, grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: float) -> torch.Tensor:
    if images.shape[-3] != 3:
        return images
    return _blend(images, grayscale(images), factor)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(-3)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    gray = chroma == 0
    safe_chroma = torch.where(gray, torch.ones_like(chroma), chroma)
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    # hue sector by which channel holds the maximum (red first, then green), in units of 60 degrees
    hue = torch.where(value == r, (g - b) / safe_chroma,
                      torch.where(value == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma))
    hue = torch.where(gray, torch.zeros_like(hue), hue)
    return torch.stack((torch.remainder(hue / 6.0, 1.0), saturation, value), -3)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """The closed form c_n = v - v s max(0, min(k, 4 - k, 1)), k = (n + 6 h) mod 6, n = 5, 3, 1 for r, g, b."""
    hue, saturation, value = images.unbind(-3)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * hue, 6.0)
        ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
        channels.append(value - value * saturation * ramp)
    return torch.stack(channels, -3)


def adjust_hue(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Rotate the hue by ``factor`` turns (factor in [-0.5, 0.5])."""
    if images.shape[-3] != 3:
        return images
    hsv = rgb_to_hsv(images)
    hue = torch.remainder(hsv[..., 0, :, :] + factor, 1.0)
    return hsv_to_rgb(torch.stack((hue, hsv[..., 1, :, :], hsv[..., 2, :, :]), -3)).clamp(0.0, 1.0)


def adjust_gamma(images: torch.Tensor, gamma: float) -> torch.Tensor:
    """x ** gamma, with x first kept away from 0 (as the reference does, so gradients stay finite)."""
    return images.clamp(1e-8, 1.0).pow(gamma).clamp(0.0, 1.0)


# -- geometry ----------------------------------------------------------------------------------------------------
def affine_sample(images: torch.Tensor, inverse: Sequence[float]) -> torch.Tensor:
    """Resample (N, C, H, W) images through an affine map given as its inverse (a, b, c, d, e, f): the output
    pixel centred at (x, y) (pixels, origin at the image centre, y down) reads the input at
    (a x + b y + c, d x + e y + f), bilinearly, zeros outside."""
    n, _, h, w = images.shape
    a, b, c, d, e, f = (float(v) for v in inverse)
    xs = torch.arange(w, device=images.device, dtype=images.dtype) - (w - 1) / 2.0
    ys = torch.arange(h, device=images.device, dtype=images.dtype) - (h - 1) / 2.0
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack(((a * x + b * y + c) / (w / 2.0), (d * x + e * y + f) / (h / 2.0)), -1)
    return F.grid_sample(images, grid.expand(n, h, w, 2), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def rotate_scale_translate(images: torch.Tensor, angle: float, translate: tuple[float, float],
                           scale: float) -> torch.Tensor:
    """torchvision's affine convention (angle in degrees, translation in pixels, about the centre)."""
    r = math.radians(angle)
    cos, sin = math.cos(r) / scale, math.sin(r) / scale
    tx, ty = translate
    return affine_sample(images, (cos, sin, -cos * tx - sin * ty, -sin, cos, sin * tx - cos * ty))


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = int(round((images.shape[-2] - height) / 2.0))
    left = int(round((images.shape[-1] - width) / 2.0))
    return images[..., top:top + height, left:left + width]


# -- ROID's consistency augmentation -------------------------------------------------------------------------------
def consistency_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of a (N, C, H, W) batch, one draw for the whole batch, in the reference's order: clip to
    [0, 1]; brightness [0.6, 1.4], contrast [0.7, 1.3], saturation [0.5, 1.5], hue [-0.06, 0.06], gamma
    [0.7, 1.3] in a random order; reflect-pad by half the size; rotate [-15, 15] degrees, translate up to 1/16 of
    the padded size (rounded to pixels), scale [0.9, 1.1]; centre crop back; horizontal flip with p = 0.5; clip."""
    h, w = images.shape[-2:]
    order = torch.randperm(5, generator=generator).tolist()
    factors = [uniform(generator, 0.6, 1.4), uniform(generator, 0.7, 1.3), uniform(generator, 0.5, 1.5),
               uniform(generator, -0.06, 0.06), uniform(generator, 0.7, 1.3)]
    pad = (int(w / 2), int(h / 2))  # left/right, top/bottom, as torchvision's Pad(int(size / 2))
    padded_w, padded_h = w + 2 * pad[0], h + 2 * pad[1]
    angle = uniform(generator, -15.0, 15.0)
    max_dx, max_dy = 0.0625 * padded_w, 0.0625 * padded_h
    translate = (float(round(uniform(generator, -max_dx, max_dx))), float(round(uniform(generator, -max_dy, max_dy))))
    scale = uniform(generator, 0.9, 1.1)
    flip = float(torch.rand((), generator=generator)) < 0.5

    ops: list[Callable[[torch.Tensor, float], torch.Tensor]] = [
        adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue, adjust_gamma]
    out = images.clamp(0.0, 1.0)
    for index in order:
        out = ops[index](out, factors[index])
    out = F.pad(out, (pad[0], pad[0], pad[1], pad[1]), mode="reflect")
    out = rotate_scale_translate(out, angle, translate, scale)
    out = center_crop(out, h, w)
    if flip:
        out = out.flip(-1)
    return out.clamp(0.0, 1.0)


# -- AugMix (MEMO) -----------------------------------------------------------------------------------------------
def _levels(images: torch.Tensor) -> torch.Tensor:
    """The images as integer grey levels 0..255 (what PIL's operations see)."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0).to(torch.int64)


def autocontrast(image: torch.Tensor) -> torch.Tensor:
    """Stretch each channel to [0, 1] (PIL's ImageOps.autocontrast without cutoff: level l -> int(l * scale +
    offset), scale = 255 / (high - low), offset = -low * scale; constant channels unchanged)."""
    levels = _levels(image)
    low = levels.amin(dim=(-2, -1), keepdim=True).to(torch.float64)
    high = levels.amax(dim=(-2, -1), keepdim=True).to(torch.float64)
    flat = high <= low
    # a true division (a Python scalar over a tensor is computed through the reciprocal, which rounds differently)
    scale = torch.full_like(high, 255.0) / torch.where(flat, torch.ones_like(high), high - low)
    stretched = torch.clamp(torch.floor(levels * scale + (-low * scale)), 0, 255)
    return torch.where(flat, levels.to(torch.float64), stretched).to(image.dtype) / 255.0


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel of a (C, H, W) image, PIL's lookup table (ImageOps.equalize)."""
    levels = _levels(image)
    out = []
    for channel in levels:
        histogram = torch.bincount(channel.flatten(), minlength=256)
        nonzero = histogram.nonzero()
        step = (int(histogram.sum()) - int(histogram[nonzero[-1]])) // 255
        if step == 0:
            out.append(channel)
            continue
        before = torch.cumsum(histogram, 0) - histogram  # pixels below each level
        table = torch.clamp((before + step // 2) // step, max=255)
        out.append(table[channel])
    return torch.stack(out).to(image.dtype) / 255.0


def posterize(image: torch.Tensor, bits: int) -> torch.Tensor:
    mask = ~((1 << (8 - bits)) - 1) & 0xFF
    return (_levels(image) & mask).to(image.dtype) / 255.0


def solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    """Invert the levels at or above ``threshold`` (0..256)."""
    levels = _levels(image)
    return torch.where(levels >= threshold, 255 - levels, levels).to(image.dtype) / 255.0


def _sample_level(generator: torch.Generator, severity: float) -> float:
    return uniform(generator, 0.1, severity)


def _signed(generator: torch.Generator, value: float) -> float:
    return -value if float(torch.rand((), generator=generator)) > 0.5 else value


def _pil_affine(image: torch.Tensor, inverse: Sequence[float]) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, data): data maps output to input pixel coordinates with the origin at the
    top-left corner; re-expressed about the centre for :func:`affine_sample`."""
    a, b, c, d, e, f = inverse
    h, w = image.shape[-2:]
    cx, cy = w / 2.0, h / 2.0
    return affine_sample(image[None], (a, b, a * cx + b * cy + c - cx, d, e, d * cx + e * cy + f - cy))[0]


def _op_autocontrast(image, severity, generator):
    return autocontrast(image)


def _op_equalize(image, severity, generator):
    return equalize(image)


def _op_posterize(image, severity, generator):
    return posterize(image, 4 - int(_sample_level(generator, severity) * 4 / 10))


def _op_rotate(image, severity, generator):
    degrees = _signed(generator, int(_sample_level(generator, severity) * 30 / 10))
    t = math.radians(degrees)  # counter-clockwise on screen, about the centre (PIL's rotate)
    return affine_sample(image[None], (math.cos(t), -math.sin(t), 0.0, math.sin(t), math.cos(t), 0.0))[0]


def _op_solarize(image, severity, generator):
    return solarize(image, 256 - int(_sample_level(generator, severity) * 256 / 10))


def _op_shear_x(image, severity, generator):
    level = _signed(generator, _sample_level(generator, severity) * 0.3 / 10)
    return _pil_affine(image, (1.0, level, 0.0, 0.0, 1.0, 0.0))


def _op_shear_y(image, severity, generator):
    level = _signed(generator, _sample_level(generator, severity) * 0.3 / 10)
    return _pil_affine(image, (1.0, 0.0, 0.0, level, 1.0, 0.0))


def _op_translate_x(image, severity, generator):
    level = _signed(generator, int(_sample_level(generator, severity) * (image.shape[-1] / 3) / 10))
    return _pil_affine(image, (1.0, 0.0, float(level), 0.0, 1.0, 0.0))


def _op_translate_y(image, severity, generator):
    level = _signed(generator, int(_sample_level(generator, severity) * (image.shape[-2] / 3) / 10))
    return _pil_affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, float(level)))


AUGMIX_OPERATIONS = (_op_autocontrast, _op_equalize, _op_posterize, _op_rotate, _op_solarize, _op_shear_x,
                     _op_shear_y, _op_translate_x, _op_translate_y)


def pad_crop_flip(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random crop of the image zero-padded by 1/8 of its size (4 pixels at 32), then a flip with p = 0.5."""
    h, w = image.shape[-2:]
    pad_h, pad_w = max(1, round(h / 8)), max(1, round(w / 8))
    top, left = randint(generator, 0, 2 * pad_h + 1), randint(generator, 0, 2 * pad_w + 1)
    out = F.pad(image, (pad_w, pad_w, pad_h, pad_h))[..., top:top + h, left:left + w]
    return out.flip(-1) if float(torch.rand((), generator=generator)) < 0.5 else out


def augmix_view(image: torch.Tensor, generator: torch.Generator, severity: float = 1.0, width: int = 3) -> torch.Tensor:
    """One AugMix view of a (C, H, W) image: x = pad_crop_flip(image); ``width`` chains of 1-3 random operations
    on x, mixed with Dirichlet(1, ..., 1) weights w; then m x + (1 - m) sum_i w_i chain_i(x), m ~ Beta(1, 1)."""
    x = pad_crop_flip(image, generator)
    exponentials = -torch.log1p(-torch.rand(width, generator=generator, dtype=torch.float64))
    weights = (exponentials / exponentials.sum()).tolist()  # Dirichlet(1, ..., 1)
    m = float(torch.rand((), generator=generator, dtype=torch.float64))  # Beta(1, 1)
    mix = torch.zeros_like(x)
    for weight in weights:
        chain = x
        for _ in range(randint(generator, 1, 4)):
            chain = AUGMIX_OPERATIONS[randint(generator, 0, len(AUGMIX_OPERATIONS))](chain, severity, generator)
        mix = mix + weight * chain
    return m * x + (1.0 - m) * mix


def augmix_views(image: torch.Tensor, n: int, generator: torch.Generator, severity: float = 1.0) -> torch.Tensor:
    """(n, C, H, W): ``n`` independent AugMix views of one (C, H, W) image."""
    return torch.stack([augmix_view(image, generator, severity) for _ in range(n)])
