"""Torch kernels shared by the corruptions: filters with scipy/OpenCV boundary rules, resampling, colour spaces,
the plasma fractal, motion-blur kernels and the glass-blur pixel shuffle.

Everything works on a whole batch at once and on any device. Images are ``(N, C, H, W)`` tensors. Boundary
modes use scipy's names, since the reference code mixes scipy, scikit-image and OpenCV:

- ``"nearest"``: edge replicated (scipy/skimage 'nearest', OpenCV BORDER_REPLICATE, ImageMagick 'edge');
- ``"reflect"``: half-sample symmetric, ``d c b a | a b c d`` (scipy 'reflect');
- ``"mirror"``: whole-sample symmetric, ``d c b | a b c d`` (scipy 'mirror', OpenCV BORDER_REFLECT_101, the
  OpenCV default border, and torch's ``F.pad(mode="reflect")``).

Boundaries are applied by index arithmetic, so a kernel may be wider than the image (scipy reflects as often
as needed; ``F.pad`` would refuse).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F


BOUNDARY_MODES = ("nearest", "reflect", "mirror")


# ----------------------------------------------------------------------------------------------- boundaries
def boundary_index(index: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer positions (any range) to ``[0, n)`` with a scipy boundary mode."""
    if mode == "nearest" or n == 1:
        return index.clamp(0, n - 1)
    if mode == "reflect":
        r = torch.remainder(index, 2 * n)
        return torch.where(r < n, r, 2 * n - 1 - r)
    if mode == "mirror":
        r = torch.remainder(index, 2 * n - 2)
        return torch.where(r < n, r, 2 * n - 2 - r)
    raise ValueError(f"unknown boundary mode {mode!r}; expected one of {BOUNDARY_MODES}")


def _pad_axis(x: torch.Tensor, before: int, after: int, mode: str, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if before == 0 and after == 0:
        return x
    if max(before, after) >= n - 1:  # wider than one reflection: gather through the index map
        index = boundary_index(torch.arange(-before, n + after, device=x.device), n, mode)
        return x.index_select(dim, index) if dim == -2 else x[..., index]
    if mode in ("mirror", "nearest") and x.dim() == 4 and x.dtype != torch.float16:  # torch's own pads: fastest
        pads = (0, 0, before, after) if dim == -2 else (before, after, 0, 0)
        return F.pad(x, pads, mode="reflect" if mode == "mirror" else "replicate")
    if mode == "nearest":
        head = x.narrow(dim, 0, 1).expand_as(x.narrow(dim, 0, before)) if before else None
        tail = x.narrow(dim, n - 1, 1).expand_as(x.narrow(dim, 0, after)) if after else None
    else:  # flipped slices: 'mirror' skips the edge pixel, 'reflect' repeats it
        skip = 1 if mode == "mirror" else 0
        head = x.narrow(dim, skip, before).flip(dim) if before else None
        tail = x.narrow(dim, n - after - skip, after).flip(dim) if after else None
    return torch.cat([p for p in (head, x, tail) if p is not None], dim=dim)


def pad_index(x: torch.Tensor, top: int, bottom: int, left: int, right: int, mode: str) -> torch.Tensor:
    """Pad the last two dimensions with a scipy boundary mode (any pad width: wide pads gather through
    ``boundary_index``; narrow ones concatenate flipped or repeated edge slices, which is faster)."""
    if mode not in BOUNDARY_MODES:
        raise ValueError(f"unknown boundary mode {mode!r}; expected one of {BOUNDARY_MODES}")
    return _pad_axis(_pad_axis(x, top, bottom, mode, -2), left, right, mode, -1)


# ----------------------------------------------------------------------------------------------- dense operators
DENSE_MAX_PIXELS = 32 * 32
_DENSE_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # least recently used first
_DENSE_CACHE_SIZE = 16  # up to 8 MB each (1024 x 1024 float64)


def apply_linear(x: torch.Tensor, key: tuple, linear: Callable[[torch.Tensor], torch.Tensor],
                 build: Callable[[int, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Apply a linear, image-independent map ``linear`` (on (B, C, H, W) batches) to ``x``.

    For small images (H * W <= 1024, i.e. 32 x 32) the map is materialised once as an (HW x HW) float64 matrix
    (``build(h, w)`` when given, else ``linear`` applied to the unit images; cached under ``key``) and applied as
    one matrix product, which on the CPU is far faster than the map's own chain of gathers or convolutions.
    Larger images run ``linear`` itself.
    """
    h, w = x.shape[-2:]
    if h * w > DENSE_MAX_PIXELS:
        return linear(x)
    key = (h, w) + tuple(key)
    if key not in _DENSE_CACHE:
        if build is not None:
            _DENSE_CACHE[key] = build(h, w).contiguous()
        else:
            basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
            _DENSE_CACHE[key] = linear(basis).reshape(h * w, h * w).T.contiguous()  # column j: pixel j's response
        while len(_DENSE_CACHE) > _DENSE_CACHE_SIZE:
            _DENSE_CACHE.popitem(last=False)
    _DENSE_CACHE.move_to_end(key)
    matrix = _DENSE_CACHE[key].to(x.device, x.dtype)
    return (x.reshape(-1, h * w) @ matrix.T).reshape(x.shape)


# ----------------------------------------------------------------------------------------------- 1-D kernels
def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> tuple[float, ...]:
    """scipy.ndimage's Gaussian taps: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    taps = [math.exp(-0.5 * (i * i) / (sigma * sigma)) for i in range(-radius, radius + 1)]
    total = math.fsum(taps)
    return tuple(t / total for t in taps)


def cv2_gaussian_kernel1d(ksize: int, sigma: float) -> tuple[float, ...]:
    """OpenCV ``getGaussianKernel(ksize, sigma)`` for sigma > 0: ``exp(-x^2 / (2 sigma^2))``, normalised."""
    centre = (ksize - 1) / 2
    taps = [math.exp(-((i - centre) ** 2) / (2 * sigma * sigma)) for i in range(ksize)]
    total = math.fsum(taps)
    return tuple(t / total for t in taps)


@lru_cache(maxsize=256)
def _filter_matrix_cpu(n: int, kernel: tuple[float, ...], mode: str) -> torch.Tensor:
    radius = len(kernel) // 2
    rows = torch.arange(n)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for t, weight in enumerate(kernel):
        cols = boundary_index(rows + (t - radius), n, mode)
        matrix.index_put_((rows, cols), torch.full((n,), weight, dtype=torch.float64), accumulate=True)
    return matrix


def filter_matrix(n: int, kernel: tuple[float, ...], mode: str, like: torch.Tensor) -> torch.Tensor:
    """The ``(n, n)`` matrix ``A`` with ``A @ signal`` = the 1-D correlation of ``signal`` with ``kernel`` under
    the boundary ``mode`` (cached on the CPU in float64; returned in ``like``'s dtype and device)."""
    return _filter_matrix_cpu(n, tuple(float(k) for k in kernel), mode).to(like.device, like.dtype)


def _use_matrix(n: int, taps: int) -> bool:
    # A dense (n x n) product is the fastest route for small images and exact for kernels wider than the image.
    return n <= 64 or taps > n


def _correlate_axis(x: torch.Tensor, kernel: tuple[float, ...], mode: str, axis: int) -> torch.Tensor:
    n = x.shape[axis]
    if len(kernel) == 1:
        return x * kernel[0]
    if _use_matrix(n, len(kernel)):
        matrix = filter_matrix(n, kernel, mode, x)
        return matrix @ x if axis == -2 else x @ matrix.T
    radius = len(kernel) // 2
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-2], shape[-1])
    weight = torch.tensor(kernel, dtype=x.dtype, device=x.device)
    if axis == -2:
        flat = F.conv2d(pad_index(flat, radius, radius, 0, 0, mode), weight.view(1, 1, -1, 1))
    else:
        flat = F.conv2d(pad_index(flat, 0, 0, radius, radius, mode), weight.view(1, 1, 1, -1))
    return flat.reshape(shape)


def separable_filter(x: torch.Tensor, kernel_h: tuple[float, ...], kernel_w: tuple[float, ...],
                     mode: str) -> torch.Tensor:
    """Correlate the last two dimensions with 1-D kernels (rows, then columns), boundary ``mode``."""
    return _correlate_axis(_correlate_axis(x, kernel_h, mode, -2), kernel_w, mode, -1)


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """``skimage.filters.gaussian`` / ``scipy.ndimage.gaussian_filter`` over the last two dimensions
    (defaults as skimage: mode 'nearest', truncate 4; sigma 0 is the identity, as in scipy)."""
    if sigma <= 1e-15:
        return x
    kernel = gaussian_kernel1d(sigma, truncate)
    return separable_filter(x, kernel, kernel, mode)


def correlate2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel of ``x`` (N, C, H, W) with one 2-D kernel (OpenCV ``filter2D``; odd sizes)."""
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    padded = pad_index(x.reshape(n * c, 1, h, w), kh // 2, kh // 2, kw // 2, kw // 2, mode)
    weight = kernel.to(x.device, x.dtype).view(1, 1, kh, kw)
    return F.conv2d(padded, weight).reshape(n, c, h, w)


def trim_kernel(kernel: torch.Tensor, rel: float = 1e-12) -> torch.Tensor:
    """Drop outer rows/columns whose taps are all below ``rel`` of the largest (keeps the kernel centred)."""
    small = kernel.abs() <= rel * kernel.abs().max()
    while kernel.shape[0] > 1 and bool(small[0].all() and small[-1].all()):
        kernel, small = kernel[1:-1], small[1:-1]
    while kernel.shape[1] > 1 and bool(small[:, 0].all() and small[:, -1].all()):
        kernel, small = kernel[:, 1:-1], small[:, 1:-1]
    return kernel


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The defocus kernel of the reference: an aliased disk on a grid of half-width 8 (or ``radius`` if larger),
    normalised, then anti-aliased by OpenCV ``GaussianBlur`` (3x3, or 5x5 for radius > 8; BORDER_REFLECT_101).
    Taps below 1e-12 of the peak are trimmed (they change no float32 result)."""
    if radius <= 8:
        half, ksize = 8, 3
    else:
        half, ksize = int(radius), 5
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).to(torch.float32)  # the reference builds it in float32
    disk = (disk / disk.sum()).to(torch.float64)
    taps = cv2_gaussian_kernel1d(ksize, alias_blur)
    blurred = separable_filter(disk, taps, taps, "mirror")
    return trim_kernel(blurred)


# ----------------------------------------------------------------------------------------------- motion blur
def motion_blur_taps(radius: float, sigma: float, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """ImageMagick ``MotionBlurImage`` taps: weights (T,) and per-image pixel offsets ``dy, dx`` (N, T).

    width = 2 * ceil(radius) + 1; weight_i = exp(-i^2 / (2 sigma^2)) normalised (a one-sided Gaussian trail);
    offset_i = ceil(i * (sin a, cos a) - 0.5) along the angle ``a`` in degrees (y axis pointing down).
    """
    if radius <= 0 or sigma <= 0:
        raise ValueError(f"motion blur needs radius > 0 and sigma > 0, got {radius}, {sigma}")
    width = 2 * math.ceil(radius) + 1
    steps = torch.arange(width, dtype=torch.float64)
    weights = torch.exp(-(steps ** 2) / (2.0 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    weights = weights / weights.sum()
    rad = angles.to(torch.float64) * (math.pi / 180.0)
    point_x, point_y = width * torch.sin(rad), width * torch.cos(rad)
    hyp = torch.hypot(point_x, point_y)[:, None]
    dx = torch.ceil(steps[None] * point_y[:, None] / hyp - 0.5).long()
    dy = torch.ceil(steps[None] * point_x[:, None] / hyp - 0.5).long()
    return weights, dy, dx


def shift_sum(x: torch.Tensor, weights: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``out[n, :, y, x] = sum_t weights[t] * x[n, :, clamp(y + dy[n, t]), clamp(x + dx[n, t])]`` (edge pixels
    replicated): a per-image sparse kernel, applied as one gather per tap (cheaper than padding first)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    dy, dx = dy.to(x.device), dx.to(x.device)
    out = torch.zeros_like(flat)
    for t in range(weights.numel()):
        iy = (rows[None] + dy[:, t, None]).clamp(0, h - 1) * w
        ix = (cols[None] + dx[:, t, None]).clamp(0, w - 1)
        index = (iy[:, :, None] + ix[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
        out.add_(flat.gather(2, index), alpha=float(weights[t]))
    return out.reshape(n, c, h, w)


def motion_blur(x: torch.Tensor, radius: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """ImageMagick's motion blur of every image at its own angle (degrees), edge pixels replicated."""
    weights, dy, dx = motion_blur_taps(radius, sigma, angles)
    return shift_sum(x, weights, dy, dx)


# ----------------------------------------------------------------------------------------------- resampling
def linear_taps(coords: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For 1-D sample positions (clamped into ``[0, n-1]``): left index, right index and right weight."""
    coords = coords.clamp(0, n - 1)
    left = coords.floor().long().clamp(0, n - 1)
    right = (left + 1).clamp(max=n - 1)
    return left, right, coords - left


def resample_separable(x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Linear interpolation on a separable grid: rows then columns (``linear_taps`` for each axis).
    (Advanced indexing, not ``index_select``: the latter is ~10x slower on the last dimension on CPU.)"""
    top, bottom, wy = (t.to(x.device) for t in rows)
    wy = wy.to(x.dtype)[:, None]
    x = x[..., top, :] * (1 - wy) + x[..., bottom, :] * wy
    left, right, wx = (t.to(x.device) for t in cols)
    wx = wx.to(x.dtype)
    return x[..., left] * (1 - wx) + x[..., right] * wx


def clipped_zoom_coords(n: int, zoom: float) -> torch.Tensor:
    """Source positions of the reference ``clipped_zoom`` along one axis of length ``n``: crop the central
    ``ceil(n / zoom)`` pixels, ``scipy.ndimage.zoom`` them (order 1, output ``round(crop * zoom)``, corner
    pixels aligned) and keep the central ``n``."""
    crop = math.ceil(n / zoom)
    top = (n - crop) // 2
    out = int(round(crop * zoom))
    trim = (out - n) // 2
    ratio = (crop - 1) / (out - 1) if out > 1 else 0.0
    return top + (torch.arange(n, dtype=torch.float64) + trim) * ratio


def interpolation_matrix(taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_in: int) -> torch.Tensor:
    """The (n_out, n_in) float64 matrix of 1-D linear interpolation given by ``linear_taps``."""
    left, right, weight = taps
    rows = torch.arange(len(left))
    matrix = torch.zeros(len(left), n_in, dtype=torch.float64)
    matrix.index_put_((rows, left), 1 - weight.to(torch.float64), accumulate=True)
    matrix.index_put_((rows, right), weight.to(torch.float64), accumulate=True)
    return matrix


def clipped_zoom_matrix(n: int, zoom: float) -> torch.Tensor:
    """``clipped_zoom`` along one axis as an (n, n) matrix."""
    return interpolation_matrix(linear_taps(clipped_zoom_coords(n, zoom), n), n)


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre of every image by ``zoom`` (>= 1), keeping the size (bilinear, as the reference);
    as two small matrix products for images up to 64 px, as gathers beyond."""
    h, w = x.shape[-2:]
    if max(h, w) <= 64:
        rows = clipped_zoom_matrix(h, zoom).to(x.device, x.dtype)
        cols = clipped_zoom_matrix(w, zoom).to(x.device, x.dtype)
        return rows @ x @ cols.T
    return resample_separable(x, linear_taps(clipped_zoom_coords(h, zoom), h),
                              linear_taps(clipped_zoom_coords(w, zoom), w))


def resize_linear_cv2(x: torch.Tensor, scale: float) -> torch.Tensor:
    """OpenCV ``resize(fx=fy=scale)`` with INTER_LINEAR: output ``round(n * scale)``, source position
    ``(i + 0.5) / scale - 0.5`` clamped to the image (no antialiasing), computed in float."""
    h, w = x.shape[-2:]
    out_h, out_w = int(round(h * scale)), int(round(w * scale))
    rows = (torch.arange(out_h, dtype=torch.float64) + 0.5) / scale - 0.5
    cols = (torch.arange(out_w, dtype=torch.float64) + 0.5) / scale - 0.5
    return resample_separable(x, linear_taps(rows, h), linear_taps(cols, w))


def sample_bilinear(x: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample every image of ``x`` (N, C, H, W) at its own positions ``ys, xs`` (N, H, W) bilinearly; the
    four neighbours outside the image are mapped with the boundary ``mode`` (scipy ``map_coordinates`` order 1,
    OpenCV ``remap`` INTER_LINEAR). The image is padded once (by ``mode``) as far as the positions reach, so
    the neighbours are plain offsets into the padded image."""
    n, c, h, w = x.shape
    y0f, x0f = torch.floor(ys), torch.floor(xs)
    wy, wx = (ys - y0f).to(x.dtype)[:, None], (xs - x0f).to(x.dtype)[:, None]
    y0, x0 = y0f.long(), x0f.long()
    y_low, y_high = (int(v) for v in torch.aminmax(y0))
    x_low, x_high = (int(v) for v in torch.aminmax(x0))
    top, left = max(0, -y_low), max(0, -x_low)
    padded = pad_index(x, top, max(0, y_high + 2 - h), left, max(0, x_high + 2 - w), mode)
    pw = padded.shape[-1]
    flat = padded.reshape(n, c, -1)
    base = ((y0 + top) * pw + (x0 + left)).reshape(n, 1, -1)

    def pick(offset: int) -> torch.Tensor:
        return flat.gather(2, (base + offset).expand(n, c, -1)).reshape(x.shape)

    upper = torch.lerp(pick(0), pick(1), wx)
    lower = torch.lerp(pick(pw), pick(pw + 1), wx)
    return torch.lerp(upper, lower, wy)


@lru_cache(maxsize=64)
def _pil_box_matrix_cpu(in_size: int, out_size: int) -> torch.Tensor:
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        centre = (xx + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        taps = [1.0 if -0.5 < (x - centre + 0.5) / filterscale <= 0.5 else 0.0 for x in range(lo, hi)]
        total = sum(taps)
        for x, tap in zip(range(lo, hi), taps):
            matrix[xx, x] = tap / total if total else tap
    return matrix


def pil_box_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.resize(..., BOX)`` along one axis as an ``(out, in)`` matrix (its ``precompute_coeffs``
    with the box filter: each output averages the input pixels whose centres fall in its footprint)."""
    return _pil_box_matrix_cpu(in_size, out_size).to(like.device, like.dtype)


# ----------------------------------------------------------------------------------------------- colour
def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """OpenCV ``COLOR_RGB2GRAY``: 0.299 R + 0.587 G + 0.114 B, shape (N, 1, H, W)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``skimage.color.rgb2hsv`` on (N, 3, H, W): H, S, V each (N, H, W); ties in the max go to blue, then
    green, then red (the order in which skimage overwrites), grey pixels get H = S = 0."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    delta = v - torch.minimum(torch.minimum(r, g), b)
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    safe_v = torch.where(v == 0, torch.ones_like(v), v)
    s = torch.where(grey, torch.zeros_like(v), delta / safe_v)
    hue = torch.where(b == v, 4.0 + (r - g) / safe_delta,
                      torch.where(g == v, 2.0 + (b - r) / safe_delta, (g - b) / safe_delta))
    hue = torch.remainder(hue / 6.0, 1.0)
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return hue, s, v


# Per sector 0..5 of the hue circle, the candidate (0 v, 1 p, 2 q, 3 t) that R, G and B take:
# sectors give (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q), as in skimage.
_HSV_SECTORS = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])


def hsv_to_rgb(hue: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``skimage.color.hsv2rgb``: sector ``floor(6 H) mod 6`` picks the (R, G, B) arrangement of v, p, q, t."""
    hi = torch.floor(hue * 6)
    f = hue * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = torch.remainder(hi.long(), 6)
    candidates = torch.stack((v, p, q, t))  # (4, N, H, W)
    index = _HSV_SECTORS.to(sector.device)[:, sector]  # (3, N, H, W): which candidate each channel takes
    return candidates.gather(0, index).movedim(0, 1)  # (N, 3, H, W)


# ----------------------------------------------------------------------------------------------- fog
def plasma_fractal(n: int, map_size: int, wibble_decay: float,
                   rand: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``n`` diamond-square height maps (n, map_size, map_size) in [0, 1], float64, as the reference's
    ``plasma_fractal`` (including its ``wibble * uniform(-wibble, wibble)`` perturbation), one per image.
    ``rand(*shape)`` gives uniform [0, 1) float64 numbers on the CPU."""
    if map_size & (map_size - 1):
        raise ValueError(f"plasma map size must be a power of two, got {map_size}")
    maps = torch.zeros(n, map_size, map_size, dtype=torch.float64)
    step, wibble = map_size, 100.0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        noise = rand(*total.shape) * (2 * wibble) - wibble
        return total / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        square = corners + torch.roll(corners, shifts=-1, dims=1)
        square = square + torch.roll(square, shifts=-1, dims=2)
        maps[:, half::step, half::step] = wibbled_mean(square)
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        left_total = centres + torch.roll(centres, 1, dims=1) + corners + torch.roll(corners, -1, dims=2)
        maps[:, 0::step, half::step] = wibbled_mean(left_total)
        top_total = centres + torch.roll(centres, 1, dims=2) + corners + torch.roll(corners, -1, dims=1)
        maps[:, half::step, 0::step] = wibbled_mean(top_total)
        step //= 2
        wibble /= wibble_decay
    maps -= maps.amin(dim=(1, 2), keepdim=True)
    return maps / maps.amax(dim=(1, 2), keepdim=True)


# ----------------------------------------------------------------------------------------------- glass blur
def glass_shuffle_index(height: int, width: int, delta: int, draws: torch.Tensor) -> torch.Tensor:
    """Where each pixel comes from after the reference's local pixel "swaps": (N, H*W) flat source indices.

    The reference walks ``h`` from ``H - delta`` down to ``delta + 1`` and, inside, ``w`` likewise, draws
    ``(dx, dy)`` in ``[-delta, delta)`` and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on an (H, W, 3)
    array. Both sides are numpy views, so the statement copies ``x[h', w']`` into ``x[h, w]`` and leaves
    ``x[h', w']`` unchanged: a sequential copy, not a swap (this is what the published datasets contain).
    Sequentially, pixel ``p`` ends up holding the value its source ``q`` had at that moment: the original
    ``q`` if ``q`` had not been written yet, else whatever ``q`` had copied. Positions are written in
    decreasing flat order, so ``p`` follows the chain ``p -> q`` while ``q`` is an interior position with a
    larger flat index; we resolve every chain at once by pointer doubling (log2 of the chain length rounds).

    ``draws`` is (N, iterations, P, 2) with ``(dx, dy)`` per visited position in the reference's visiting order.
    """
    n, iterations, _, _ = draws.shape
    hs = torch.tensor(list(range(height - delta, delta, -1)), dtype=torch.long)
    ws = torch.tensor(list(range(width - delta, delta, -1)), dtype=torch.long)
    ph = hs.repeat_interleave(len(ws))
    pw = ws.repeat(len(hs))
    p = ph * width + pw
    total = torch.arange(height * width).expand(n, -1)
    for it in range(iterations):
        dx, dy = draws[:, it, :, 0].long(), draws[:, it, :, 1].long()
        qh, qw = ph + dy, pw + dx
        q = qh * width + qw
        interior = (qh >= delta + 1) & (qh <= height - delta) & (qw >= delta + 1) & (qw <= width - delta)
        follow = interior & (q > p)
        pointer = torch.arange(height * width).repeat(n, 1)
        done = torch.ones(n, height * width, dtype=torch.bool)
        pointer[:, p] = q
        done[:, p] = ~follow
        while not bool(done.all()):
            following, following_done = pointer.gather(1, pointer), done.gather(1, pointer)
            pointer = torch.where(done, pointer, following)
            done = done | following_done
        total = total.gather(1, pointer)
    return total
