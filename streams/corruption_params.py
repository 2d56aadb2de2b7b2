"""The corruption parameters: one table per resolution, five severities per corruption (one place for each fact).

Sources (read in the public reference code; the numbers are copied, the code is ours):

- ``cifar`` (32 px, CIFAR-10-C / CIFAR-100-C): Hendrycks & Dietterich, ``ImageNet-C/create_c/make_cifar_c.py``
  in github.com/hendrycks/robustness; the same numbers are in this project's METHODS.md ("Corruptions").
- ``tiny`` (64 px, Tiny-ImageNet-C): ``ImageNet-C/create_c/make_tinyimagenet_c.py`` in the same repository.
- ``imagenet`` (224 px, ImageNet-C): ``ImageNet-C/create_c/make_imagenet_c.py`` in the same repository; the
  ``imagecorruptions`` package (github.com/bethgelab/imagecorruptions) ships the same numbers for the 19
  corruptions except ``elastic_transform``, which it re-parameterised (we keep the original ImageNet-C one,
  including its ``244`` factor: "244 should have been 224, but ultimately nothing is incorrect").

Entry layout per corruption (what ``streams.corruptions`` reads):

==================  ===========================================================================================
gaussian_noise      sigma of N(0, sigma) added to x
shot_noise          c: poisson(x * c) / c
impulse_noise       amount: probability that a value is replaced by salt (1) or pepper (0)
speckle_noise       sigma: x + x * N(0, sigma)
gaussian_blur       sigma (scipy/skimage convention: mode 'nearest', truncate 4)
glass_blur          (sigma, max_delta, iterations)
defocus_blur        (radius, alias_blur)
motion_blur         (radius, sigma) of ImageMagick's MotionBlurImage; angle uniform in (-45, 45)
zoom_blur           (start, stop, step) of ``np.arange``: the zoom factors
snow                (loc, scale, zoom, threshold, blur_radius, blur_sigma, blend)
frost               (image weight, frost weight)
fog                 (strength, wibble decay)
brightness          added to V in HSV
contrast            c: (x - mean) * c + mean, per image and channel
elastic_transform   (alpha, sigma, affine jitter) in pixels
pixelate            c: box-downsample to int(size * c), box-upsample back
jpeg_compression    JPEG quality
spatter             (loc, scale, sigma, threshold, intensity, mud)
saturate            (mul, add) on S in HSV
==================  ===========================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class ParamSet:
    """The parameters of one resolution: the image size they were made for and the per-severity table."""

    name: str
    size: int                    # the square image side the table was made for
    fog_map_size: int            # side of the plasma-fractal map (power of two, >= image side)
    frost_scale: float           # the frost photographs are resized by this factor before cropping
    severities: Mapping[str, tuple[Any, ...]]


def _elastic(size: int, rows: tuple[tuple[float, float, float], ...]) -> tuple[tuple[float, float, float], ...]:
    """The original writes elastic parameters as fractions of the image side (IMSIZE * f)."""
    return tuple((size * a, size * s, size * f) for a, s, f in rows)


_ZOOM_32_64 = ((1, 1.06, .01), (1, 1.11, .01), (1, 1.16, .01), (1, 1.21, .01), (1, 1.26, .01))

CIFAR = ParamSet("cifar", 32, fog_map_size=32, frost_scale=0.2, severities=MappingProxyType({
    "gaussian_noise": (.04, .06, .08, .09, .10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (.01, .02, .03, .05, .07),
    "speckle_noise": (.06, .1, .12, .16, .2),
    "gaussian_blur": (.4, .6, .7, .8, 1),
    "glass_blur": ((.05, 1, 1), (.25, 1, 1), (.4, 1, 1), (.25, 1, 2), (.4, 1, 2)),
    "defocus_blur": ((.3, .4), (.4, .5), (.5, .6), (1, .2), (1.5, .1)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": _ZOOM_32_64,
    "snow": ((.1, .2, 1, .6, 8, 3, .95), (.1, .2, 1, .5, 10, 4, .9), (.15, .3, 1.75, .55, 10, 4, .9),
             (.25, .3, 2.25, .6, 12, 6, .85), (.3, .3, 1.25, .65, 14, 12, .8)),
    "frost": ((1, .2), (1, .3), (.9, .4), (.85, .4), (.75, .45)),
    "fog": ((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (.05, .1, .15, .2, .3),
    "contrast": (.75, .5, .4, .3, .15),
    "elastic_transform": _elastic(32, ((0, 0, .08), (.05, .2, .07), (.08, .06, .06), (.1, .04, .05),
                                       (.1, .03, .03))),
    "pixelate": (.95, .9, .85, .75, .65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "spatter": ((.62, .1, .7, .7, .5, 0), (.65, .1, .8, .7, .5, 0), (.65, .3, 1, .69, .5, 0),
                (.65, .1, .7, .69, .6, 1), (.65, .1, .5, .68, .6, 1)),
    "saturate": ((.3, 0), (.1, 0), (1.5, 0), (2, .1), (2.5, .2)),
}))

TINY = ParamSet("tiny", 64, fog_map_size=64, frost_scale=0.3, severities=MappingProxyType({
    "gaussian_noise": (.04, .08, .12, .15, .18),
    "shot_noise": (250, 100, 50, 30, 15),
    "impulse_noise": (.01, .02, .05, .08, .14),
    "speckle_noise": (.15, .2, .25, .3, .35),
    "gaussian_blur": (.5, .75, 1, 1.25, 1.5),
    "glass_blur": ((.1, 1, 1), (.5, 1, 1), (.6, 1, 2), (.7, 2, 1), (.9, 2, 2)),
    "defocus_blur": ((.5, .6), (1, .1), (1.5, .1), (2.5, .01), (3, .1)),
    "motion_blur": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
    "zoom_blur": _ZOOM_32_64,
    "snow": ((.1, .2, 1, .6, 8, 3, .8), (.1, .2, 1, .5, 10, 4, .8), (.15, .3, 1.75, .55, 10, 4, .7),
             (.25, .3, 2.25, .6, 12, 6, .65), (.3, .3, 1.25, .65, 14, 12, .6)),
    "frost": ((1, .3), (.9, .4), (.8, .45), (.75, .5), (.7, .55)),
    "fog": ((.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
    "brightness": (.1, .2, .3, .4, .5),
    "contrast": (.4, .3, .2, .1, .05),
    "elastic_transform": _elastic(64, ((0, 0, .08), (.05, .3, .06), (.1, .08, .06), (.1, .03, .03),
                                       (.16, .03, .02))),
    "pixelate": (.9, .8, .7, .6, .5),
    "jpeg_compression": (65, 58, 50, 40, 25),
    "spatter": ((.62, .1, .7, .7, .6, 0), (.65, .1, .8, .7, .6, 0), (.65, .3, 1, .69, .6, 0),
                (.65, .1, .7, .68, .6, 1), (.65, .1, .5, .67, .6, 1)),
    "saturate": ((.3, 0), (.1, 0), (2, 0), (5, .1), (30, .2)),
}))

IMAGENET = ParamSet("imagenet", 224, fog_map_size=256, frost_scale=1.0, severities=MappingProxyType({
    "gaussian_noise": (.08, .12, .18, .26, .38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (.03, .06, .09, .17, .27),
    "speckle_noise": (.15, .2, .35, .45, .6),
    "gaussian_blur": (1, 2, 3, 4, 6),
    "glass_blur": ((.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    "defocus_blur": ((3, .1), (4, .5), (6, .5), (8, .5), (10, .5)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "zoom_blur": ((1, 1.11, .01), (1, 1.16, .01), (1, 1.21, .02), (1, 1.26, .02), (1, 1.31, .03)),
    "snow": ((.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .9, 12, 8, .7),
             (.55, .3, 4.5, .85, 12, 8, .65), (.55, .3, 2.5, .85, 12, 12, .55)),
    "frost": ((1, .4), (.8, .6), (.7, .7), (.65, .7), (.6, .75)),
    "fog": ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    "brightness": (.1, .2, .3, .4, .5),
    "contrast": (.4, .3, .2, .1, .05),
    "elastic_transform": tuple((244 * a, 244 * s, 244 * f) for a, s, f in (
        (2, .7, .1), (2, .08, .2), (.05, .01, .02), (.07, .01, .02), (.12, .01, .02))),
    "pixelate": (.6, .5, .4, .3, .25),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "spatter": ((.65, .3, 4, .69, .6, 0), (.65, .3, 3, .68, .6, 0), (.65, .3, 2, .68, .5, 0),
                (.65, .3, 1, .65, 1.5, 1), (.67, .4, 1, .65, 1.5, 1)),
    "saturate": ((.3, 0), (.1, 0), (2, 0), (5, .1), (20, .2)),
}))

PARAM_SETS: Mapping[str, ParamSet] = MappingProxyType({p.name: p for p in (CIFAR, TINY, IMAGENET)})
SIZE_TO_PARAMS: Mapping[int, str] = MappingProxyType({p.size: p.name for p in PARAM_SETS.values()})


def resolve_param_set(params: str | None, height: int, width: int) -> ParamSet:
    """The table named ``params``, or (``params=None``) the one made for a square image of this size."""
    if params is None:
        if height == width and height in SIZE_TO_PARAMS:
            return PARAM_SETS[SIZE_TO_PARAMS[height]]
        known = ", ".join(f"{size}x{size} -> {name!r}" for size, name in SIZE_TO_PARAMS.items())
        raise ValueError(f"no corruption parameter set is made for {height}x{width} images ({known}); "
                         f"pass params= one of {sorted(PARAM_SETS)} to use a table at another size")
    if params not in PARAM_SETS:
        raise ValueError(f"unknown params {params!r}; expected one of {sorted(PARAM_SETS)} or None")
    return PARAM_SETS[params]


def zoom_factors(start: float, stop: float, step: float) -> tuple[float, ...]:
    """``np.arange(start, stop, step)`` exactly, without numpy: same length rule, and the same values (numpy
    fills ``start + i * delta`` with ``delta = (start + step) - start``, e.g. 1.2500000000000002, not 1.25)."""
    import math

    count = max(0, math.ceil((stop - start) / step))
    delta = (start + step) - start
    return tuple(start + i * delta for i in range(count))
