"""Reference corruptions: straightforward numpy / scipy / scikit-image / Pillow versions of the same algorithms with
the same parameters (``streams.corruption_params``), one image at a time, the way the original ``make_cifar_c.py``
runs. Used by ``benchmarks/corruption_speed.py`` (the baseline) and by ``tests/test_corruptions.py`` (agreement).

Every function takes one image ``x`` (H, W, 3) float64 in [0, 1], the severity, a ``numpy.random.Generator``
and the parameter-set name, and returns (H, W, 3) float64 in [0, 1]. Random corruptions accept their random
draws as keyword overrides so the deterministic part can be compared with ``streams.corruptions``.

The original needs OpenCV and Wand/ImageMagick, which are not dependencies here; their steps are written with
numpy/scipy following the same definitions: ``cv2.filter2D``/``GaussianBlur`` -> ``scipy.ndimage.correlate``
with mode 'mirror' (= BORDER_REFLECT_101); Wand's motion blur -> the numpy shift-and-add of ``imagecorruptions``;
``cv2.warpAffine`` -> ``scipy.ndimage.affine_transform(order=1, mode='mirror')``; ``cv2.resize`` (frost) ->
``skimage.transform.rescale(order=1)``; spatter's ``cv2.distanceTransform`` (5x5 chamfer) -> the exact Euclidean
``scipy.ndimage.distance_transform_edt`` and ``cv2.Canny`` -> a numpy Canny with OpenCV's rules.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from PIL import Image
from skimage import color as skcolor
from skimage.filters import gaussian
from skimage.transform import rescale
from skimage.util import random_noise

from streams.corruption_params import PARAM_SETS

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


def _c(name: str, severity: int, params: str):
    return PARAM_SETS[params].severities[name][severity - 1]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded (the same quantisation ``streams.corruption_jpeg`` uses)."""
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ noise
def gaussian_noise(x, severity, rng, params="cifar"):
    return np.clip(x + rng.normal(size=x.shape, scale=_c("gaussian_noise", severity, params)), 0, 1)


def shot_noise(x, severity, rng, params="cifar"):
    c = _c("shot_noise", severity, params)
    return np.clip(rng.poisson(x * c) / c, 0, 1)


def impulse_noise(x, severity, rng, params="cifar"):
    return np.clip(random_noise(x, mode="s&p", amount=_c("impulse_noise", severity, params), rng=rng), 0, 1)


def speckle_noise(x, severity, rng, params="cifar"):
    c = _c("speckle_noise", severity, params)
    return np.clip(x + x * rng.normal(size=x.shape, scale=c), 0, 1)


# ------------------------------------------------------------------------------------------------ blur
def gaussian_blur(x, severity, rng, params="cifar"):
    return np.clip(gaussian(x, sigma=_c("gaussian_blur", severity, params), channel_axis=-1), 0, 1)


def glass_blur(x, severity, rng, params="cifar", displacements=None):
    """``displacements``: (iterations, positions, 2) of (dx, dy), overriding the random draws."""
    sigma, delta, iterations = _c("glass_blur", severity, params)
    img = np.uint8(gaussian(x, sigma=sigma, channel_axis=-1) * 255)
    h_size, w_size = img.shape[:2]
    for it in range(iterations):
        k = 0
        for h in range(h_size - delta, delta, -1):
            for w in range(w_size - delta, delta, -1):
                if displacements is None:
                    dx, dy = rng.integers(-delta, delta, size=(2,))
                else:
                    dx, dy = (int(v) for v in displacements[it, k])
                k += 1
                h_prime, w_prime = h + dy, w + dx
                # the original statement, with its numpy-view semantics (a copy, not a swap)
                img[h, w], img[h_prime, w_prime] = img[h_prime, w_prime], img[h, w]
    return np.clip(gaussian(img / 255.0, sigma=sigma, channel_axis=-1), 0, 1)


def _cv2_gaussian_taps(ksize, sigma):
    i = np.arange(ksize) - (ksize - 1) / 2
    taps = np.exp(-(i ** 2) / (2 * sigma * sigma))
    return taps / taps.sum()


def disk(radius, alias_blur):
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    aliased = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    aliased /= np.sum(aliased)
    taps = _cv2_gaussian_taps(ksize, alias_blur)
    out = ndi.correlate1d(aliased.astype(np.float64), taps, axis=0, mode="mirror")
    return ndi.correlate1d(out, taps, axis=1, mode="mirror")


def defocus_blur(x, severity, rng, params="cifar"):
    kernel = disk(*_c("defocus_blur", severity, params))
    channels = [ndi.correlate(x[:, :, d], kernel, mode="mirror") for d in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 1)


def _shift(image, dx, dy):
    """out[y, x] = image[clip(y - dy), clip(x - dx)] (edges replicated), as ``imagecorruptions.shift``."""
    h, w = image.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return image[rows][:, cols]


def motion_blur_np(image, radius, sigma, angle):
    """The numpy motion blur of ``imagecorruptions`` (Wand's MotionBlurImage kernel), edges replicated."""
    width = 2 * math.ceil(radius) + 1
    kernel = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel /= kernel.sum()
    point = (width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    blurred = np.zeros_like(image, dtype=np.float64)
    for i in range(width):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        blurred = blurred + kernel[i] * _shift(image, dx, dy)
    return blurred


def motion_blur(x, severity, rng, params="cifar", angle=None):
    radius, sigma = _c("motion_blur", severity, params)
    angle = rng.uniform(-45, 45) if angle is None else angle
    return np.clip(motion_blur_np(x, radius, sigma, angle), 0, 1)


def clipped_zoom(img, zoom_factor):
    h = img.shape[0]
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    img = ndi.zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
    trim_top = (img.shape[0] - h) // 2
    return img[trim_top:trim_top + h, trim_top:trim_top + h]


def zoom_blur(x, severity, rng, params="cifar"):
    factors = np.arange(*_c("zoom_blur", severity, params))
    x = x.astype(np.float32)
    out = np.zeros_like(x)
    for zoom_factor in factors:
        out += clipped_zoom(x, zoom_factor)
    return np.clip((x + out) / (len(factors) + 1), 0, 1).astype(np.float64)


# ------------------------------------------------------------------------------------------------ weather
def snow(x, severity, rng, params="cifar", layer=None, angle=None):
    loc, scale, zoom, threshold, radius, sigma, blend = _c("snow", severity, params)
    snow_layer = rng.normal(size=x.shape[:2], loc=loc, scale=scale) if layer is None else layer
    snow_layer = clipped_zoom(snow_layer[..., np.newaxis], zoom)
    snow_layer[snow_layer < threshold] = 0
    snow_layer = (np.clip(snow_layer.squeeze(), 0, 1) * 255).astype(np.uint8) / 255.0
    angle = rng.uniform(-135, -45) if angle is None else angle
    snow_layer = motion_blur_np(snow_layer, radius, sigma, angle)
    snow_layer = (np.round(snow_layer * 255) / 255.0)[..., np.newaxis]
    grey = x @ np.array([0.299, 0.587, 0.114])
    x = blend * x + (1 - blend) * np.maximum(x, grey[..., np.newaxis] * 1.5 + 0.5)
    return np.clip(x + snow_layer + np.rot90(snow_layer, k=2), 0, 1)


_FROST_CACHE: dict = {}


def _frost_photos(frost_dir, scale):
    key = (str(frost_dir), scale)
    if key not in _FROST_CACHE:
        photos = []
        for name in FROST_FILES:
            photo = np.asarray(Image.open(Path(frost_dir) / name).convert("RGB"), dtype=np.float64)
            if scale != 1:
                photo = rescale(photo, scale, order=1, anti_aliasing=False, channel_axis=-1, preserve_range=True)
            photos.append(np.floor(photo + 0.5).astype(np.uint8))
        _FROST_CACHE[key] = photos
    return _FROST_CACHE[key]


def frost(x, severity, rng, params="cifar", frost_dir=None):
    weight_x, weight_frost = _c("frost", severity, params)
    photo = _frost_photos(frost_dir, PARAM_SETS[params].frost_scale)[rng.integers(5)]
    h, w = x.shape[:2]
    top, left = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
    crop = photo[top:top + h, left:left + w] / 255.0
    return np.clip(weight_x * x + weight_frost * crop, 0, 1)


def plasma_fractal(rng, mapsize=256, wibbledecay=3):
    """The diamond-square height map of the original (numpy, one map)."""
    maparray = np.empty((mapsize, mapsize), dtype=np.float64)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array):
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        drgrid = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def fog(x, severity, rng, params="cifar", plasma=None):
    strength, decay = _c("fog", severity, params)
    size = PARAM_SETS[params].fog_map_size
    plasma = plasma_fractal(rng, size, decay) if plasma is None else plasma
    max_val = x.max()
    x = x + strength * plasma[:x.shape[0], :x.shape[1]][..., np.newaxis]
    return np.clip(x * max_val / (max_val + strength), 0, 1)


# ------------------------------------------------------------------------------------------------ digital
def brightness(x, severity, rng, params="cifar"):
    hsv = skcolor.rgb2hsv(x)
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + _c("brightness", severity, params), 0, 1)
    return np.clip(skcolor.hsv2rgb(hsv), 0, 1)


def saturate(x, severity, rng, params="cifar"):
    mul, add = _c("saturate", severity, params)
    hsv = skcolor.rgb2hsv(x)
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * mul + add, 0, 1)
    return np.clip(skcolor.hsv2rgb(hsv), 0, 1)


def contrast(x, severity, rng, params="cifar"):
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * _c("contrast", severity, params) + means, 0, 1)


def elastic_transform(x, severity, rng, params="cifar", jitter=None, fields=None):
    """``jitter`` (3, 2) and ``fields`` (2, H, W) of uniform draws override the random ones."""
    alpha, sigma, affine = _c("elastic_transform", severity, params)
    shape_size = x.shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float32([center_square + square_size,
                       [center_square[0] + square_size, center_square[1] - square_size],
                       center_square - square_size])
    jitter = rng.uniform(-affine, affine, size=pts1.shape) if jitter is None else jitter
    pts2 = pts1 + np.asarray(jitter).astype(np.float32)
    design = np.hstack([pts1.astype(np.float64), np.ones((3, 1))])
    forward = np.linalg.solve(design, pts2.astype(np.float64)).T  # cv2.getAffineTransform: (2, 3)
    inverse = np.linalg.inv(forward[:, :2])
    offset = -inverse @ forward[:, 2]
    matrix_rc = np.array([[inverse[1, 1], inverse[1, 0]], [inverse[0, 1], inverse[0, 0]]])
    offset_rc = np.array([offset[1], offset[0]])
    image = np.stack([ndi.affine_transform(x[:, :, d], matrix_rc, offset=offset_rc, order=1, mode="mirror")
                      for d in range(x.shape[2])], axis=-1)
    if fields is None:
        fields = (rng.uniform(-1, 1, size=shape_size), rng.uniform(-1, 1, size=shape_size))
    dx = (gaussian(fields[0], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (gaussian(fields[1], sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(shape_size[0]), np.arange(shape_size[1]), indexing="ij")
    coords = [rows + dy, cols + dx]
    out = np.stack([ndi.map_coordinates(image[:, :, d], coords, order=1, mode="reflect")
                    for d in range(x.shape[2])], axis=-1)
    return np.clip(out, 0, 1)


def pixelate(x, severity, rng, params="cifar"):
    c = _c("pixelate", severity, params)
    h, w = x.shape[:2]
    img = Image.fromarray(to_uint8(x))
    img = img.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(img) / 255.0


def jpeg_compression(x, severity, rng, params="cifar"):
    output = io.BytesIO()
    Image.fromarray(to_uint8(x)).save(output, "JPEG", quality=_c("jpeg_compression", severity, params))
    return np.asarray(Image.open(output)) / 255.0


# ------------------------------------------------------------------------------------------------ spatter
_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])


def canny_np(image, low, high):
    """cv2.Canny(aperture 3, L1 gradient) in numpy: Sobel (edges replicated), 4-direction non-maximum
    suppression with OpenCV's comparisons, hysteresis as connected components holding a strong pixel."""
    img = image.astype(np.int64)
    gx = ndi.correlate(img, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]), mode="nearest")
    gy = ndi.correlate(img, np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]), mode="nearest")
    mag = np.abs(gx) + np.abs(gy)
    p = np.pad(mag, 1)
    left, right, up, down = p[1:-1, :-2], p[1:-1, 2:], p[:-2, 1:-1], p[2:, 1:-1]
    ax, ay = np.abs(gx), np.abs(gy) << 15
    tg22x = ax * int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    same = (gx ^ gy) >= 0
    diag = np.where(same, (mag > p[:-2, :-2]) & (mag > p[2:, 2:]), (mag > p[:-2, 2:]) & (mag > p[2:, :-2]))
    is_max = np.where(horizontal, (mag > left) & (mag >= right), np.where(vertical, (mag > up) & (mag >= down), diag))
    candidate = is_max & (mag > int(low))
    labels, _ = ndi.label(candidate, structure=np.ones((3, 3)))
    strong_labels = np.unique(labels[candidate & (mag > int(high))])
    return np.isin(labels, strong_labels[strong_labels > 0])


def equalize_hist_np(image):
    hist = np.bincount(image.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = image.size
    if hist[first] == total:
        return image.copy()
    scale = np.float32(255.0) / np.float32(total - hist[first])
    cumulative = np.cumsum(hist) - np.cumsum(hist)[first]
    lut = np.clip(np.round(cumulative.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return lut[image]


def spatter(x, severity, rng, params="cifar", layer=None):
    loc, scale, sigma, threshold, intensity, mud = _c("spatter", severity, params)
    liquid = rng.normal(size=x.shape[:2], loc=loc, scale=scale) if layer is None else layer
    liquid = gaussian(liquid, sigma=sigma)
    liquid[liquid < threshold] = 0
    if mud == 0:
        level = np.mod(np.floor(liquid * 255), 256).astype(np.uint8)  # astype(uint8) wraps on x86
        edges = canny_np(level, 50, 150)
        dist = np.minimum(ndi.distance_transform_edt(~edges), 20)
        dist = ndi.uniform_filter(dist, 3, mode="mirror").astype(np.float32).astype(np.uint8)
        dist = equalize_hist_np(dist)
        dist = np.clip(ndi.correlate(dist.astype(np.int64), _EMBOSS, mode="mirror"), 0, 255)
        dist = np.round(ndi.uniform_filter(dist.astype(np.float64), 3, mode="mirror")).astype(np.float32)
        m = level * dist
        m = m / m.max() * intensity if m.max() > 0 else m
        colour = np.array([175, 238, 238]) / 255.0
        return np.clip(x + m[..., np.newaxis] * colour, 0, 1)
    m = gaussian(np.where(liquid > threshold, 1, 0).astype(np.float32), sigma=intensity)
    m[m < 0.8] = 0
    colour = np.array([63, 42, 20]) / 255.0 * m[..., np.newaxis]
    return np.clip(x * (1 - m[..., np.newaxis]) + colour, 0, 1)


REFERENCES = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "snow": snow, "frost": frost, "fog": fog, "brightness": brightness, "contrast": contrast,
    "elastic_transform": elastic_transform, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "spatter": spatter, "saturate": saturate,
}
