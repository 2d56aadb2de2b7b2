"""Batched image augmentations drawn from explicit ``torch.Generator`` objects (CoTTA's test-time transform).

CoTTA (Wang et al. 2022) averages its teacher's predictions over augmented copies of the batch, and RoTTA (Yuan et
al. 2023) trains its student on strongly augmented memory samples; both references use the same transform (MD
``classification/augmentations/transforms_cotta.py``, ``get_tta_transforms``, in turn from KATANA, Samuel &
Chechik 2021), a torchvision pipeline on a batch tensor in [0, 1]:

    clip to [0, 1] -> colour jitter (brightness, contrast, saturation, hue, gamma, in a random order)
    -> edge padding by H/2 -> random affine (rotation, translation by up to 1/16 of the padded size, scale;
    bilinear, fill 0) -> Gaussian blur (kernel 5) -> centre crop back to H x W -> horizontal flip (p 0.5)
    -> additive Gaussian noise (std 0.005) -> clip to [0, 1]

As in the reference (torchvision draws one set of parameters per call), each call draws ONE set of parameters for
the whole batch; only the noise differs per pixel. :class:`CottaAugment` is our own implementation of those
operations in plain torch, written from their definitions (torchvision's conventions: ITU-R 601 luma 0.2989 /
0.587 / 0.114, contrast around the per-image mean of the luma, inverse affine map about the image centre with
pixel centres at half-integers, the fill applied through a sampled validity mask). The scalar parameters come from a
CPU generator (no device synchronisation); the noise from a generator on the images' device. The affine warp and
the blur are computed only for the crop (plus the blur's 2-pixel margin), which gives the same values as warping
and blurring the whole padded image: the blur's reflection at the padded border never reaches the crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

LUMA = (0.2989, 0.587, 0.114)
#: The colour operations, in the index order of ``AugmentParameters.order``.
COLOUR_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")


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
    sigma: float  # Gaussian blur's standard deviation
    flip: bool


@dataclass(frozen=True)
class CottaAugment:
    """The CoTTA/KATANA transform; ``soft=True`` is its milder variant (the reference's ``soft`` flag)."""

    soft: bool = False
    noise_std: float = 0.005

    @property
    def ranges(self) -> dict[str, tuple[float, float]]:
        if self.soft:
            return {"brightness": (0.8, 1.2), "contrast": (0.85, 1.15), "saturation": (0.75, 1.25),
                    "hue": (-0.03, 0.03), "gamma": (0.85, 1.15), "angle": (-8.0, 8.0), "scale": (0.95, 1.05),
                    "sigma": (0.001, 0.25)}
        return {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.5, 1.5), "hue": (-0.06, 0.06),
                "gamma": (0.7, 1.3), "angle": (-15.0, 15.0), "scale": (0.9, 1.1), "sigma": (0.001, 0.5)}

    def sample(self, generator: torch.Generator, height: int, width: int) -> AugmentParameters:
        """Draw one set of parameters from ``generator`` (a CPU generator) for images of the given size."""
        order = tuple(torch.randperm(5, generator=generator).tolist())
        u = torch.rand(10, generator=generator, dtype=torch.float64).tolist()
        r = self.ranges

        def uniform(value: float, name: str) -> float:
            low, high = r[name]
            return low + (high - low) * value

        pad = height // 2
        max_dx, max_dy = (width + 2 * pad) / 16, (height + 2 * pad) / 16  # translate=(1/16, 1/16) of the padded size
        return AugmentParameters(
            order=order, brightness=uniform(u[0], "brightness"), contrast=uniform(u[1], "contrast"),
            saturation=uniform(u[2], "saturation"), hue=uniform(u[3], "hue"), gamma=uniform(u[4], "gamma"),
            angle=uniform(u[5], "angle"),
            translate=(int(round(-max_dx + 2 * max_dx * u[6])), int(round(-max_dy + 2 * max_dy * u[7]))),
            scale=uniform(u[8], "scale"), sigma=uniform(u[9], "sigma"),
            flip=bool(torch.rand((), generator=generator) < 0.5))

    def __call__(self, x: torch.Tensor, generator: torch.Generator,
                 noise_generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment the (N, C, H, W) batch ``x`` (C = 1 or 3, values in [0, 1]) with one draw of parameters from
        ``generator`` (CPU) and noise from ``noise_generator`` (on x's device; ``generator`` when None)."""
        check_images(x)
        params = self.sample(generator, x.shape[-2], x.shape[-1])
        noise = torch.randn(x.shape, generator=noise_generator or generator, device=x.device, dtype=x.dtype)
        return self.apply(x, params, noise)

    def apply(self, x: torch.Tensor, params: AugmentParameters, noise: torch.Tensor | None) -> torch.Tensor:
        """The transform with the given parameters; ``noise`` is a standard normal tensor shaped like ``x``."""
        check_images(x)
        out = x.clamp(0.0, 1.0)
        for index in params.order:
            op = COLOUR_OPS[index]
            out = COLOUR_FUNCTIONS[op](out, getattr(params, op))
        out = warp_and_blur(out, params.angle, params.translate, params.scale, params.sigma)
        if params.flip:
            out = out.flip(-1)
        if noise is not None:
            out = out + noise * self.noise_std
        return out.clamp(0.0, 1.0)


def check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] not in (1, 3) or min(x.shape[-2:]) < 4:
        raise ValueError("the CoTTA augmentations take (N, C, H, W) images with C = 1 or 3 channels and H, W >= 4 "
                         f"(values in [0, 1]); got shape {tuple(x.shape)}")


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) grey level (ITU-R 601 weights) of (N, 3, H, W) RGB images; a 1-channel image is its own."""
    if x.shape[1] == 1:
        return x
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def blend(x: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clipped to [0, 1]."""
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    return blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if x.shape[1] == 1 else blend(x, luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of RGB images by ``shift`` turns (HSV; saturation and value kept)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    chroma = value - x.min(1).values
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    c = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sector = torch.where(value == r, (g - b) / c, torch.where(value == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    hue = torch.remainder(sector / 6.0 + shift, 1.0)
    # HSV -> RGB: channel n (R: 5, G: 3, B: 1) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * hue, 6.0)
        channels.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def adjust_gamma(x: torch.Tensor, gamma: float) -> torch.Tensor:
    # the reference clamps to [1e-8, 1] first (a gamma after a contrast could otherwise give NaN gradients)
    return x.clamp(1e-8, 1.0).pow(gamma).clamp(0.0, 1.0)


COLOUR_FUNCTIONS = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
                    "hue": adjust_hue, "gamma": adjust_gamma}


def warp_and_blur(x: torch.Tensor, angle: float, translate: tuple[int, int], scale: float,
                  sigma: float) -> torch.Tensor:
    """Edge-pad by H // 2, rotate/translate/scale about the centre (bilinear, fill 0), blur (kernel 5, ``sigma``)
    and crop the centre H x W: computed on the crop and its 2-pixel margin only."""
    n, channels, height, width = x.shape
    pad, margin = height // 2, 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    big_h, big_w = height + 2 * pad, width + 2 * pad
    # Inverse map (output pixel -> input pixel) in pixel coordinates centred on the image centre.
    rad = math.radians(angle)
    cos, sin = math.cos(rad) / scale, math.sin(rad) / scale
    tx, ty = translate
    inverse = ((cos, sin, -cos * tx - sin * ty), (-sin, cos, sin * tx - cos * ty))
    # Output pixels kept: rows/columns pad - margin .. pad + size + margin of the padded image.
    opts = {"dtype": x.dtype, "device": x.device}
    xs = torch.arange(pad - margin, pad + width + margin, **opts) - (big_w - 1) / 2
    ys = torch.arange(pad - margin, pad + height + margin, **opts) - (big_h - 1) / 2
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    # grid_sample's normalised coordinates (align_corners=False): pixel offset from the centre / (size / 2).
    grid = torch.stack([(inverse[0][0] * xs + inverse[0][1] * ys + inverse[0][2]) / (big_w / 2),
                        (inverse[1][0] * xs + inverse[1][1] * ys + inverse[1][2]) / (big_h / 2)], -1)[None]
    warped = F.grid_sample(padded, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    # Fill 0 as torchvision applies it: multiply by the warped all-ones image (the share of in-image neighbours).
    valid = F.grid_sample(torch.ones(1, 1, big_h, big_w, **opts), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    warped = warped * valid
    taps = torch.arange(-margin, margin + 1, **opts)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    kernel2d = (kernel[:, None] * kernel[None, :]).expand(channels, 1, -1, -1)
    return F.conv2d(warped, kernel2d, groups=channels)


class RandomDraws:
    """The adapter's random numbers: a CPU generator for augmentation parameters and one on the data's device for
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
