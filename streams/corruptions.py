"""The corruption generator: the 15 benchmark corruptions of CIFAR-10-C / Tiny-ImageNet-C / ImageNet-C and the 4
validation ones (Hendrycks & Dietterich, ICLR 2019), in torch, on whole batches, seeded.

``corrupt(x, name, severity, seed, params=..., frost_dir=...)`` takes float images (N, 3, H, W) in [0, 1] on any
device and returns the corrupted batch with the same shape, dtype and device, in [0, 1]. The parameters come from
``streams.corruption_params`` (one table per resolution: ``cifar`` 32 px, ``tiny`` 64 px, ``imagenet`` 224 px;
chosen from the image size when ``params`` is None).

Randomness: one ``torch.Generator`` on the CPU seeded with ``seed``; every random number is drawn from it on the
CPU and then moved to ``x``'s device, so the same seed gives the same draws on every device and bitwise-identical
results on the CPU. No global RNG and no numpy RNG are touched.

Deviations from the reference code (each is explained where it happens and in docs/corruptions.md):

- numbers are floats from end to end: the input is not re-quantised to 8 bits and the output is not truncated
  with ``np.uint8`` as the published .npy files are (JPEG is the exception: the codec needs 8-bit images);
- Wand/ImageMagick motion blur (motion_blur, snow) is the same kernel built in torch (``corruption_ops``);
- OpenCV steps (defocus kernel, frost resize, elastic warp, spatter's Canny, distance transform, histogram
  equalisation) are torch re-implementations of OpenCV's behaviour;
- loops over pixels are vectorised: glass blur's sequential pixel copies are resolved exactly by pointer doubling,
  zoom blur, the plasma fractal and the elastic warp run on the whole batch;
- random numbers come from torch (a different generator and order than numpy: same distributions, other draws).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from streams import corruption_cv as cv
from streams import corruption_ops as ops
from streams.corruption_jpeg import jpeg_roundtrip
from streams.corruption_params import ParamSet, resolve_param_set, zoom_factors
from streams.corruption_photos import FROST_USED, frost_photos

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


@dataclass(frozen=True)
class Context:
    """What a corruption needs besides the image and its severity entry."""

    params: ParamSet
    generator: torch.Generator
    frost_dir: str | os.PathLike | None = None

    def rand(self, *shape: int, like: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Uniform [0, 1) numbers drawn on the CPU, moved to ``like``'s device and dtype when given."""
        draw = torch.rand(shape, generator=self.generator, dtype=dtype)
        return draw if like is None else draw.to(like.device, like.dtype)

    def randn(self, *shape: int, like: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normal numbers drawn on the CPU, moved to ``like``'s device and dtype when given."""
        draw = torch.randn(shape, generator=self.generator, dtype=dtype)
        return draw if like is None else draw.to(like.device, like.dtype)

    def randint(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Integers in ``[low, high)`` (int16), drawn on the CPU."""
        return torch.randint(low, high, shape, generator=self.generator, dtype=torch.int16)


# --------------------------------------------------------------------------------------------------- noise
def gaussian_noise(x: torch.Tensor, sigma: float, ctx: Context) -> torch.Tensor:
    """``x + N(0, sigma)`` per value."""
    return x + sigma * ctx.randn(*x.shape, like=x, dtype=x.dtype)


def shot_noise(x: torch.Tensor, c: float, ctx: Context) -> torch.Tensor:
    """``poisson(x * c) / c`` per value (photon noise; the mean is kept). Sampled on the CPU generator, in the
    working dtype (float32 rates sample ~20 % faster; the counts are exact integers either way)."""
    counts = torch.poisson(x.detach().to("cpu") * c, generator=ctx.generator)
    return (counts / c).to(x.device, x.dtype)


def impulse_noise(x: torch.Tensor, amount: float, ctx: Context) -> torch.Tensor:
    """Salt and pepper as ``skimage.util.random_noise(mode='s&p')``: each value (per channel) is replaced with
    probability ``amount``, by 1 or 0 with equal odds (a Bernoulli draw per value, as scikit-image does)."""
    u = ctx.rand(*x.shape, dtype=torch.float32).to(x.device)
    # one uniform per value: u <= amount flips it (probability amount), and given a flip, u <= amount / 2 (odds 1/2)
    # makes it salt: the same joint law as skimage's two Bernoulli draws, at half the random numbers
    return torch.where(u <= amount, (u <= amount / 2).to(x.dtype), x)


def speckle_noise(x: torch.Tensor, sigma: float, ctx: Context) -> torch.Tensor:
    """Multiplicative noise ``x + x * N(0, sigma)``."""
    return x + x * (sigma * ctx.randn(*x.shape, like=x, dtype=x.dtype))


# --------------------------------------------------------------------------------------------------- blur
def gaussian_blur(x: torch.Tensor, sigma: float, ctx: Context) -> torch.Tensor:
    """``skimage.filters.gaussian(sigma)`` per channel (scipy taps, truncate 4, edge pixels replicated)."""
    return ops.gaussian_filter(x, sigma, "nearest")


def glass_blur(x: torch.Tensor, c: tuple[float, int, int], ctx: Context) -> torch.Tensor:
    """Gaussian blur, 8-bit truncation (``np.uint8``), local pixel shuffling, Gaussian blur again.

    The shuffle reproduces what the reference's loop really does (sequential copies from a random neighbour
    within ``[-delta, delta)``, see ``ops.glass_shuffle_index``), for all images at once. The first blur is done
    in float64 so that the truncation to 8 bits lands on the same level as the reference's float64 numpy.
    """
    sigma, delta, iterations = c
    n, channels, h, w = x.shape
    blurred = ops.gaussian_filter(x.to(torch.float64), sigma, "nearest")
    levels = torch.floor(blurred * 255).clamp(0, 255) / 255
    visited = len(range(h - delta, delta, -1)) * len(range(w - delta, delta, -1))
    draws = ctx.randint(-delta, delta, n, iterations, visited, 2)
    source = ops.glass_shuffle_index(h, w, delta, draws).to(x.device)
    shuffled = levels.reshape(n, channels, h * w).gather(2, source[:, None].expand(n, channels, h * w))
    return ops.gaussian_filter(shuffled.reshape(x.shape).to(x.dtype), sigma, "nearest")


def defocus_blur(x: torch.Tensor, c: tuple[float, float], ctx: Context) -> torch.Tensor:
    """Correlation with an anti-aliased disk (``ops.disk_kernel``), OpenCV's default border (reflect 101)."""
    radius, alias_blur = c
    kernel = ops.disk_kernel(radius, alias_blur)
    return ops.apply_linear(x, ("defocus", radius, alias_blur), lambda v: ops.correlate2d(v, kernel, "mirror"))


def motion_blur(x: torch.Tensor, c: tuple[float, float], ctx: Context) -> torch.Tensor:
    """ImageMagick ``MotionBlurImage(radius, sigma, angle)`` with the angle uniform in (-45, 45) degrees per image;
    the kernel (a one-sided Gaussian trail of 2 * radius + 1 taps) is built in torch, as in ``imagecorruptions``."""
    radius, sigma = c
    angles = ctx.rand(x.shape[0]) * 90 - 45
    return ops.motion_blur(x, radius, sigma, angles)


def zoom_blur(x: torch.Tensor, c: tuple[float, float, float], ctx: Context) -> torch.Tensor:
    """Mean of the image and its central zooms by each factor of ``np.arange(*c)`` (bilinear, as
    ``scipy.ndimage.zoom(order=1)`` on the central crop; here as separable gathers on the whole batch)."""
    factors = zoom_factors(*c)

    def blur(v: torch.Tensor) -> torch.Tensor:
        total = v.clone()
        for factor in factors:
            total += ops.clipped_zoom(v, factor)
        return total / (len(factors) + 1)

    def matrix(h: int, w: int) -> torch.Tensor:  # the same map on flattened images: kron(rows, cols) per zoom
        total = torch.eye(h * w, dtype=torch.float64)
        for factor in factors:
            total += torch.kron(ops.clipped_zoom_matrix(h, factor), ops.clipped_zoom_matrix(w, factor))
        return total / (len(factors) + 1)

    return ops.apply_linear(x, ("zoom", factors), blur, matrix)


# --------------------------------------------------------------------------------------------------- weather
def snow(x: torch.Tensor, c: tuple[float, ...], ctx: Context) -> torch.Tensor:
    """A thresholded, zoomed Gaussian snow layer, motion-blurred at an angle uniform in (-135, -45) degrees, added
    twice (as is and rotated by 180 degrees) to the image whitened towards ``1.5 * grey + 0.5``.

    The reference converts the layer to 8 bits (truncation) before ImageMagick and reads back 8 bits (rounding);
    both quantisations are kept since they shape the flakes.
    """
    loc, scale, zoom, threshold, blur_radius, blur_sigma, blend = c
    n, _, h, w = x.shape
    layer = ctx.randn(n, 1, h, w) * scale + loc
    layer = ops.clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255
    angles = ctx.rand(n) * 90 - 135
    layer = ops.motion_blur(layer, blur_radius, blur_sigma, angles)
    layer = (torch.round(layer * 255) / 255).to(x.device, x.dtype)
    whitened = torch.maximum(x, ops.rgb_to_gray(x) * 1.5 + 0.5)
    x = blend * x + (1 - blend) * whitened
    return x + layer + torch.flip(layer, dims=(-2, -1))


def frost(x: torch.Tensor, c: tuple[float, float], ctx: Context) -> torch.Tensor:
    """``image_weight * x + frost_weight * crop``: a random crop of one of frost1..frost5 (picked uniformly; the
    reference's ``randint(5)`` never picks frost6), after shrinking the photos by the table's ``frost_scale``."""
    image_weight, frost_weight = c
    n, _, h, w = x.shape
    photos, sizes = frost_photos(ctx.frost_dir, ctx.params.frost_scale)
    min_h, min_w = int(sizes[:, 0].min()), int(sizes[:, 1].min())
    if h >= min_h or w >= min_w:
        raise ValueError(f"frost with params={ctx.params.name!r} crops {h}x{w} from the frost photos resized by "
                         f"{ctx.params.frost_scale}, the smallest of which is {min_h}x{min_w}: the image must be "
                         f"smaller than that (pass the params made for this image size)")
    which = (ctx.rand(n) * FROST_USED).long()
    top = (ctx.rand(n) * (sizes[which, 0] - h)).long()
    left = (ctx.rand(n) * (sizes[which, 1] - w)).long()
    windows = photos.unfold(2, h, 1).unfold(3, w, 1)  # a view: (5, 3, rows, cols, H, W), every crop position
    crops = windows[which, :, top, left]  # (N, 3, H, W) uint8
    return torch.addcmul(x * image_weight, crops.to(x.device, x.dtype), torch.tensor(frost_weight / 255))


def fog(x: torch.Tensor, c: tuple[float, float], ctx: Context) -> torch.Tensor:
    """``(x + strength * plasma) * max / (max + strength)`` with a diamond-square plasma map per image and ``max``
    the image's largest value before the fog."""
    strength, decay = c
    n, _, h, w = x.shape
    size = ctx.params.fog_map_size
    if h > size or w > size:
        raise ValueError(f"fog with params={ctx.params.name!r} draws a {size}x{size} plasma map; the image "
                         f"({h}x{w}) must not be larger (pass the params made for this image size)")
    plasma = ops.plasma_fractal(n, size, decay, ctx.rand)[:, None, :h, :w].to(x.device, x.dtype)
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * plasma) * peak / (peak + strength)


# --------------------------------------------------------------------------------------------------- digital
def brightness(x: torch.Tensor, c: float, ctx: Context) -> torch.Tensor:
    """Add ``c`` to V in HSV (clipped to [0, 1]), with scikit-image's ``rgb2hsv``/``hsv2rgb`` conventions."""
    hue, s, v = ops.rgb_to_hsv(x)
    return ops.hsv_to_rgb(hue, s, (v + c).clamp(0, 1))


def saturate(x: torch.Tensor, c: tuple[float, float], ctx: Context) -> torch.Tensor:
    """``S * mul + add`` in HSV (clipped to [0, 1])."""
    mul, add = c
    hue, s, v = ops.rgb_to_hsv(x)
    return ops.hsv_to_rgb(hue, (s * mul + add).clamp(0, 1), v)


def contrast(x: torch.Tensor, c: float, ctx: Context) -> torch.Tensor:
    """``(x - mean) * c + mean`` with the mean per image and channel."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * c + mean


def elastic_transform(x: torch.Tensor, c: tuple[float, float, float], ctx: Context) -> torch.Tensor:
    """A random affine warp, then a smooth random displacement field (the reference's "elastic" transform).

    Affine: the three points ``centre +- side // 3`` are jittered by uniform(-affine, affine) in float32, the
    affine map between them is solved (``cv2.getAffineTransform``) and the image resampled through its inverse,
    bilinearly, border reflect-101 (``cv2.warpAffine``; OpenCV rounds sample positions to 1/32 px, we do not).
    Elastic: two uniform(-1, 1) fields blurred with ``gaussian(sigma, mode='reflect', truncate=3)`` times
    ``alpha`` displace the columns and rows; the image is sampled there bilinearly with scipy's 'reflect'
    boundary (``map_coordinates(order=1)``). With ``alpha = 0`` (CIFAR severity 1) only the affine part acts.
    """
    alpha, sigma, jitter = c
    n, _, h, w = x.shape
    centre = torch.tensor([h // 2, w // 2], dtype=torch.float32)
    side = min(h, w) // 3
    if side == 0:
        raise ValueError(f"elastic_transform needs images of at least 3x3 pixels (its affine anchors are "
                         f"side // 3 apart), got {h}x{w}")
    src = torch.stack([centre + side, torch.stack([centre[0] + side, centre[1] - side]), centre - side])
    dst = (src[None] + (ctx.rand(n, 3, 2) * (2 * jitter) - jitter).to(torch.float32)).to(torch.float64)
    src = src.to(torch.float64)
    design = torch.cat([src, torch.ones(3, 1, dtype=torch.float64)], dim=1)  # rows (x, y, 1)
    forward = torch.linalg.solve(design.expand(n, 3, 3), dst).transpose(1, 2)  # (N, 2, 3): dst = M @ (x, y, 1)
    inverse = torch.linalg.inv(forward[:, :, :2])
    offset = -(inverse @ forward[:, :, 2:])
    rows = torch.arange(h, dtype=torch.float64)[None, :, None]
    cols = torch.arange(w, dtype=torch.float64)[None, None, :]
    inverse, offset = inverse[:, :, :, None, None], offset[:, :, 0, None, None]
    src_x = inverse[:, 0, 0] * cols + (inverse[:, 0, 1] * rows + offset[:, 0])  # (N, H, W) by broadcasting
    src_y = inverse[:, 1, 0] * cols + (inverse[:, 1, 1] * rows + offset[:, 1])
    warped = ops.sample_bilinear(x, src_y.to(x.device), src_x.to(x.device), "mirror")
    if alpha == 0:
        return warped
    shift_x = ops.gaussian_filter(ctx.rand(n, h, w) * 2 - 1, sigma, "reflect", truncate=3) * alpha
    shift_y = ops.gaussian_filter(ctx.rand(n, h, w) * 2 - 1, sigma, "reflect", truncate=3) * alpha
    shift_x, shift_y = shift_x.to(torch.float32).to(torch.float64), shift_y.to(torch.float32).to(torch.float64)
    return ops.sample_bilinear(warped, (rows + shift_y).to(x.device), (cols + shift_x).to(x.device), "reflect")


def pixelate(x: torch.Tensor, c: float, ctx: Context) -> torch.Tensor:
    """Pillow BOX resize to ``int(side * c)`` and BOX resize back, as one (side x side) matrix per axis
    (Pillow's own coefficients; in float, where Pillow rounds to 8 bits after each of its two passes)."""
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * c)), max(1, int(w * c))
    rows = ops.pil_box_matrix(small_h, h, x) @ ops.pil_box_matrix(h, small_h, x)
    cols = ops.pil_box_matrix(small_w, w, x) @ ops.pil_box_matrix(w, small_w, x)
    return rows @ x @ cols.T


def jpeg_compression(x: torch.Tensor, quality: int, ctx: Context) -> torch.Tensor:
    """JPEG encode/decode of every image at ``quality`` with Pillow (see ``streams.corruption_jpeg``)."""
    return jpeg_roundtrip(x, quality)


_EMBOSS = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
_WATER = (175 / 255, 238 / 255, 238 / 255)
_MUD = (63 / 255, 42 / 255, 20 / 255)


def spatter(x: torch.Tensor, c: tuple[float, ...], ctx: Context) -> torch.Tensor:
    """Water drops (``mud = 0``) or mud (``mud = 1``) from a blurred, thresholded Gaussian "liquid" layer.

    Water: the layer in 8 bits (``astype(np.uint8)``: truncated, and wrapping above 255 as numpy does on this
    platform), its Canny edges, the distance to them (5x5 chamfer, truncated at 20), 3x3 mean, histogram
    equalisation, an emboss filter and another 3x3 mean give a relief; layer * relief, normalised to its
    maximum and times ``intensity``, adds pale turquoise (175, 238, 238). The OpenCV steps are in
    ``streams.corruption_cv``. Mud: the layer's support blurred with sigma ``intensity``, kept above 0.8,
    blends towards brown (63, 42, 20).
    """
    loc, scale, sigma, threshold, intensity, mud = c
    n, _, h, w = x.shape
    liquid = ops.gaussian_filter(ctx.randn(n, h, w) * scale + loc, sigma, "nearest")
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if mud == 0:
        level = torch.remainder(torch.floor(liquid * 255), 256).long()
        edges = cv.canny(level, 50, 150)
        relief = cv.box3_float_to_uint8(cv.distance_transform(edges, 20))
        relief = cv.box3_uint8(cv.filter2d_uint8(cv.equalize_hist(relief), _EMBOSS))
        drops = level.to(torch.float32) * relief.to(torch.float32)
        peak = drops.amax(dim=(1, 2), keepdim=True)
        drops = torch.where(peak > 0, drops / torch.where(peak > 0, peak, torch.ones_like(peak)), drops) * intensity
        colour = torch.tensor(_WATER, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x + drops[:, None].to(x.device, x.dtype) * colour
    cover = ops.gaussian_filter((liquid > threshold).to(torch.float32), intensity, "nearest")
    cover = torch.where(cover < 0.8, torch.zeros_like(cover), cover)[:, None].to(x.device, x.dtype)
    colour = torch.tensor(_MUD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x * (1 - cover) + colour * cover


# --------------------------------------------------------------------------------------------------- public
_FUNCTIONS: dict[str, Callable[[torch.Tensor, Any, Context], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "snow": snow, "frost": frost, "fog": fog, "brightness": brightness, "contrast": contrast,
    "elastic_transform": elastic_transform, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "spatter": spatter, "saturate": saturate,
}


def _check_input(x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (N, 3, H, W) with floats in [0, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor with values in [0, 1], got dtype {x.dtype} "
                         f"(convert 8-bit images with x.float() / 255)")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (N, 3, H, W) (RGB images, channels first), got {tuple(x.shape)}")
    if x.numel():
        low, high = torch.aminmax(x.detach())
        if bool(torch.isnan(low) | torch.isnan(high)) or float(low) < 0 or float(high) > 1:
            raise ValueError(f"x must hold values in [0, 1], got min {float(low):.4g}, max {float(high):.4g}")


def _check_choice(name: Any, severity: Any) -> None:
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64) (a torch.Generator seed), got {seed!r}")
    return int(seed)


def corrupt(x: torch.Tensor, name: str, severity: int = 5, seed: int = 0, *, params: str | None = None,
            frost_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Corrupt a batch ``x`` (N, 3, H, W), floats in [0, 1], with corruption ``name`` at ``severity`` (1..5).

    ``params``: "cifar" (32 px), "tiny" (64 px) or "imagenet" (224 px) parameter table; None picks it from the
    (square) image size. ``seed``: all random draws come from ``torch.Generator().manual_seed(seed)``.
    ``frost_dir``: folder of the frost photographs (else ``$TTA_FROST_DIR``, else the ``imagecorruptions``
    package). Returns a new tensor like ``x`` (shape, dtype, device) clipped to [0, 1].
    """
    _check_input(x)
    _check_choice(name, severity)
    seed = _check_seed(seed)
    param_set = resolve_param_set(params, int(x.shape[2]), int(x.shape[3]))
    if x.shape[0] == 0:
        return x.clone()
    generator = torch.Generator().manual_seed(seed)
    work = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    entry = param_set.severities[name][int(severity) - 1]
    out = _FUNCTIONS[name](work, entry, Context(param_set, generator, frost_dir))
    return out.clamp(0, 1).to(x.dtype)
