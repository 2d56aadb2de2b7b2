"""Image augmentations in plain PyTorch, on float images in [0, 1], for methods that adapt on augmented views.

Every random choice is drawn from a ``torch.Generator`` that the caller owns (CPU for parameters; noise from one on
the images' device), so an adapter can restore its augmentation stream bitwise on ``reset()``; the pixel work runs
on the images' own device and dtype. Two families, sharing one set of colour operations and one affine warp:

* :class:`CottaAugment`: the test-time transform of the reference (mariodoebler/test-time-adaptation, MD,
  ``classification/augmentations/transforms_cotta.py``, ``get_tta_transforms``, in turn from KATANA, Samuel &
  Chechik 2021), a torchvision pipeline on a batch tensor::

      clip to [0, 1] -> colour jitter (brightness, contrast, saturation, hue, gamma, in a random order)
      -> padding by H // 2 -> random affine (rotation, translation by up to 1/16 of the padded size, scale;
      bilinear, fill 0) [-> Gaussian blur (kernel 5)] -> centre crop back to H x W -> horizontal flip (p 0.5)
      [-> additive Gaussian noise (std 0.005)] -> clip to [0, 1]

  CoTTA (Wang et al. 2022) and RoTTA (Yuan et al. 2023) use it with edge padding, blur and noise
  (``CottaAugment()``); ROID (Marsden et al. 2024) without blur and noise, with reflect padding
  (:func:`consistency_augment`; MD's ``get_tta_transforms(..., padding_mode="reflect", cotta_augs=False)``). As
  torchvision's transforms on a batched tensor, each call draws ONE set of parameters for the whole batch; only
  the noise differs per pixel.
* :func:`augmix_views`: MEMO's AugMix-style views of one image (Hendrycks et al. 2020's operations on PIL images in
  the reference; here on tensors, without PIL's uint8 rounding between operations).

The operations are our own, written from their definitions in torchvision's conventions: the colour operations
use its tensor arithmetic (ITU-R 601 luma 0.2989 / 0.587 / 0.114, contrast around the per-image mean of the luma,
clamping to [0, 1] after each blend); the warp is its inverse affine map about the image centre with pixel centres
at half-integers, sampled bilinearly with ``grid_sample`` (zeros outside), and its ``fill`` applied through a
warped validity mask. For given parameters they agree with ``torchvision.transforms.functional`` to rounding
(tests/test_method_roid.py and tests/test_method_cotta.py check it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F


# -- random draws (CPU generator, Python numbers) ----------------------------------------------------------------
def uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


class RandomDraws:
    """An adapter's random numbers: a CPU generator for augmentation parameters and one on the data's device for
    noise and masks (the same generator on CPU), all from one seed; ``reseed()`` starts them over."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.reseed()

    def reseed(self) -> None:
        self.cpu = torch.Generator().manual_seed(self.seed)
        self._devices: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        """The generator for tensors made on ``device``."""
        if device.type == "cpu":
            return self.cpu
        if device not in self._devices:
            self._devices[device] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._devices[device]

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "cpu": self.cpu.get_state(),
                "devices": {str(d): g.get_state() for d, g in self._devices.items()}}

    def load(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.reseed()
        self.cpu.set_state(state["cpu"])
        for name, value in state.get("devices", {}).items():
            self.on(torch.device(name)).set_state(value)


def resolve_seed(seed: int) -> int:
    """``seed``, or torch's initial seed (what ``torch.manual_seed`` last set) when it is negative."""
    return int(torch.initial_seed() if seed < 0 else seed) % (2 ** 63)


# -- colour ------------------------------------------------------------------------------------------------------
LUMA = (0.2989, 0.587, 0.114)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(..., 1, H, W) luma of RGB images (ITU-R 601-2 weights, as torchvision); other channel counts: the mean."""
    if images.shape[-3] == 3:
        r, g, b = images.unbind(-3)
        return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3)
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


#: The colour operations, in the index order of ``AugmentParameters.order`` (the reference's ColorJitterPro).
COLOUR_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")
COLOUR_FUNCTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
    "hue": adjust_hue, "gamma": adjust_gamma}


# -- geometry ----------------------------------------------------------------------------------------------------
def affine_sample(images: torch.Tensor, inverse: Sequence[float], fill: float | None = None,
                  window: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Resample (N, C, H, W) images through an affine map given as its inverse (a, b, c, d, e, f): the output
    pixel centred at (x, y) (pixels, origin at the image centre, y down) reads the input at
    (a x + b y + c, d x + e y + f), bilinearly, zeros outside. With ``fill`` (torchvision's), the result is then
    blended towards ``fill`` by the share of the sampled neighbours outside the image (torchvision warps an all-ones
    mask alongside: out * mask + (1 - mask) * fill). ``window`` = (top, left, height, width) computes only those
    output pixels (rows top..top + height - 1 of the output grid, which may reach past the image), the same values
    as cropping the whole output."""
    n, _, h, w = images.shape
    top, left, out_h, out_w = window if window is not None else (0, 0, h, w)
    a, b, c, d, e, f = (float(v) for v in inverse)
    opts = {"dtype": images.dtype, "device": images.device}
    xs = torch.arange(left, left + out_w, **opts) - (w - 1) / 2.0
    ys = torch.arange(top, top + out_h, **opts) - (h - 1) / 2.0
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    # grid_sample's normalised coordinates (align_corners=False): pixel offset from the centre / (size / 2)
    grid = torch.stack(((a * x + b * y + c) / (w / 2.0), (d * x + e * y + f) / (h / 2.0)), -1)[None]
    out = F.grid_sample(images, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    if fill is None:
        return out
    mask = F.grid_sample(torch.ones(1, 1, h, w, **opts), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)
    return out * mask + (1.0 - mask) * fill


def rotate_scale_translate(images: torch.Tensor, angle: float, translate: tuple[float, float], scale: float,
                           fill: float | None = None,
                           window: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """torchvision's affine convention (angle in degrees, counter-clockwise; translation in pixels; about the
    centre), through :func:`affine_sample` (``fill`` and ``window`` as there)."""
    r = math.radians(angle)
    cos, sin = math.cos(r) / scale, math.sin(r) / scale
    tx, ty = translate
    return affine_sample(images, (cos, sin, -cos * tx - sin * ty, -sin, cos, sin * tx - cos * ty), fill, window)


def gaussian_blur_valid(images: torch.Tensor, sigma: float, radius: int = 2) -> torch.Tensor:
    """Convolve (N, C, H, W) images with torchvision's Gaussian kernel of size 2 radius + 1 (taps exp(-t^2 /
    (2 sigma^2)) at integer t, normalised; the outer product of two), without padding: the output is 2 radius
    smaller each way (the caller supplies the margin)."""
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    return F.conv2d(images, (kernel[:, None] * kernel[None, :]).expand(channels, 1, -1, -1), groups=channels)


# -- the CoTTA / ROID test-time transform -----------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentParameters:
    """One draw of the transform's parameters (applied to a whole batch)."""

    order: tuple[int, ...]  # a permutation of range(5): the order of the colour operations (COLOUR_OPS)
    brightness: float
    contrast: float
    saturation: float
    hue: float  # a fraction of a full turn of the hue circle
    gamma: float
    angle: float  # degrees, counter-clockwise as torchvision's
    translate: tuple[int, int]  # (tx, ty) pixels
    scale: float
    sigma: float | None  # Gaussian blur's standard deviation (None: no blur)
    flip: bool


_PADDING_MODES = {"edge": "replicate", "reflect": "reflect"}  # torchvision's names -> torch.nn.functional.pad's


@dataclass(frozen=True)
class CottaAugment:
    """MD's ``get_tta_transforms`` (module docstring): ``soft`` is its milder variant, ``padding_mode`` its padding
    ("edge" or "reflect"), ``blur_and_noise`` its ``cotta_augs`` (the Gaussian blur and the additive noise of
    std ``noise_std``; without them no blur sigma and no noise are drawn)."""

    soft: bool = False
    noise_std: float = 0.005
    padding_mode: str = "edge"
    blur_and_noise: bool = True

    def __post_init__(self) -> None:
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {sorted(_PADDING_MODES)}, got {self.padding_mode!r}")

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        if self.soft:
            r = {"brightness": (0.8, 1.2), "contrast": (0.85, 1.15), "saturation": (0.75, 1.25), "hue": (-0.03, 0.03),
                 "gamma": (0.85, 1.15), "angle": (-8.0, 8.0), "scale": (0.95, 1.05), "sigma": (0.001, 0.25)}
        else:
            r = {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.5, 1.5), "hue": (-0.06, 0.06),
                 "gamma": (0.7, 1.3), "angle": (-15.0, 15.0), "scale": (0.9, 1.1), "sigma": (0.001, 0.5)}
        if not self.blur_and_noise:
            del r["sigma"]
        return r

    def sample(self, generator: torch.Generator, height: int, width: int) -> AugmentParameters:
        """Draw one set of parameters from ``generator`` (a CPU generator) for images of the given size: the colour
        order, then uniforms for the colour factors, angle, translation, scale (and blur sigma), then the flip."""
        order = tuple(torch.randperm(5, generator=generator).tolist())
        u = torch.rand(10 if self.blur_and_noise else 9, generator=generator, dtype=torch.float64).tolist()
        r = self.ranges

        def scaled(value: float, name: str) -> float:
            low, high = r[name]
            return low + (high - low) * value

        pad = height // 2
        max_dx, max_dy = (width + 2 * pad) / 16, (height + 2 * pad) / 16  # translate=(1/16, 1/16) of the padded size
        return AugmentParameters(
            order=order, brightness=scaled(u[0], "brightness"), contrast=scaled(u[1], "contrast"),
            saturation=scaled(u[2], "saturation"), hue=scaled(u[3], "hue"), gamma=scaled(u[4], "gamma"),
            angle=scaled(u[5], "angle"),
            translate=(int(round(-max_dx + 2 * max_dx * u[6])), int(round(-max_dy + 2 * max_dy * u[7]))),
            scale=scaled(u[8], "scale"), sigma=scaled(u[9], "sigma") if self.blur_and_noise else None,
            flip=bool(torch.rand((), generator=generator) < 0.5))

    def __call__(self, x: torch.Tensor, generator: torch.Generator,
                 noise_generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment the (N, C, H, W) batch ``x`` (values in [0, 1]) with one draw of parameters from ``generator``
        (CPU) and, with ``blur_and_noise``, noise from ``noise_generator`` (on x's device; ``generator`` when
        None)."""
        params = self.sample(generator, x.shape[-2], x.shape[-1])
        noise = None
        if self.blur_and_noise:
            noise = torch.randn(x.shape, generator=noise_generator or generator, device=x.device, dtype=x.dtype)
        return self.apply(x, params, noise)

    def apply(self, x: torch.Tensor, params: AugmentParameters, noise: torch.Tensor | None) -> torch.Tensor:
        """The transform with the given parameters; ``noise`` is a standard normal tensor shaped like ``x`` (None:
        no noise). The warp and the blur are computed only for the crop (plus the blur's 2-pixel margin), which
        gives the same values as warping and blurring the whole padded image: the blur's reflection at the padded
        border never reaches the crop."""
        out = x.clamp(0.0, 1.0)
        for index in params.order:
            op = COLOUR_OPS[index]
            out = COLOUR_FUNCTIONS[op](out, getattr(params, op))
        height, width = x.shape[-2:]
        pad = height // 2  # the reference's Pad(int(n_pixels / 2)) on every side, n_pixels = the height
        margin = 2 if params.sigma is not None else 0
        out = F.pad(out, (pad, pad, pad, pad), mode=_PADDING_MODES[self.padding_mode])
        out = rotate_scale_translate(out, params.angle, params.translate, params.scale, fill=0.0,
                                     window=(pad - margin, pad - margin, height + 2 * margin, width + 2 * margin))
        if params.sigma is not None:
            out = gaussian_blur_valid(out, params.sigma, margin)
        if params.flip:
            out = out.flip(-1)
        if noise is not None:
            out = out + noise * self.noise_std
        return out.clamp(0.0, 1.0)


def check_images(x: torch.Tensor, method: str) -> None:
    """What CoTTA and RoTTA accept (torchvision's colour operations take 1 or 3 channels); errors name ``method``."""
    if x.dim() != 4 or x.shape[1] not in (1, 3) or min(x.shape[-2:]) < 4:
        raise ValueError(f"{method}: the CoTTA augmentations take (N, C, H, W) images with C = 1 or 3 channels and "
                         f"H, W >= 4 (values in [0, 1]); got shape {tuple(x.shape)}")


#: ROID's consistency transform: MD ``get_tta_transforms(img_size, padding_mode="reflect", cotta_augs=False)``.
ROID_TRANSFORM = CottaAugment(padding_mode="reflect", blur_and_noise=False)


def consistency_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of a (N, C, H, W) batch for ROID's consistency loss (:data:`ROID_TRANSFORM`), one parameter
    draw from ``generator`` for the whole batch: clip; brightness [0.6, 1.4], contrast [0.7, 1.3], saturation
    [0.5, 1.5], hue [-0.06, 0.06], gamma [0.7, 1.3] in a random order; reflect-pad by H // 2; rotate [-15, 15]
    degrees, translate up to 1/16 of the padded size (rounded to pixels), scale [0.9, 1.1], fill 0; centre crop
    back; horizontal flip with p = 0.5; clip."""
    return ROID_TRANSFORM(images, generator)


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
