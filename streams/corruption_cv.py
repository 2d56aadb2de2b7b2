"""The OpenCV steps of the ``spatter`` corruption, written in torch for a whole batch of 8-bit images.

The reference (``make_*_c.py``) runs, on a uint8 "liquid" layer: ``cv2.Canny(50, 150)``, ``cv2.distanceTransform``
(DIST_L2, 5x5 mask), ``cv2.threshold`` (TRUNC at 20), ``cv2.blur`` 3x3, ``cv2.equalizeHist``, ``cv2.filter2D``
with an emboss kernel and another ``cv2.blur``. OpenCV is not a dependency of this project, so each step is
re-implemented here from OpenCV's documented (and source) behaviour, integer arithmetic included where it
changes values. Images are integer tensors (N, H, W) holding 0..255 unless said otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from streams.corruption_ops import pad_index

_SOBEL_X = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)
# cv2.distanceTransform(DIST_L2, 5): chamfer weights 1, 1.4, 2.1969 in 16-bit fixed point.
_DIST_SHIFT = 16
_CHAMFER_5x5 = tuple([(dy, dx, 65536) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
                     + [(dy, dx, 91750) for dy, dx in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
                     + [(dy, dx, 143976) for dy, dx in ((1, 2), (1, -2), (-1, 2), (-1, -2),
                                                         (2, 1), (2, -1), (-2, 1), (-2, -1))])


def _correlate3x3(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """3x3 correlation of (N, H, W) in float64 (exact for 8-bit inputs and small integer kernels)."""
    padded = pad_index(x.to(torch.float64)[:, None], 1, 1, 1, 1, mode)
    return F.conv2d(padded, kernel.to(x.device, torch.float64).view(1, 1, 3, 3))[:, 0]


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``cv2.Canny(image, low, high)`` (aperture 3, L1 gradient) as a bool edge map (N, H, W).

    Sobel derivatives with replicated borders; magnitude |gx| + |gy|; non-maximum suppression in four directions
    with OpenCV's integer tangent test (tan 22.5 deg in 15-bit fixed point) and its asymmetric comparisons
    (``>`` on one side, ``>=`` on the other; ``>`` both sides on diagonals), neighbours outside the image count
    as 0; pixels above ``low`` that survive are candidates, above ``high`` strong; hysteresis keeps candidates
    8-connected to a strong pixel (grown by repeated 3x3 dilation until nothing changes).
    """
    low_i, high_i = int(low // 1), int(high // 1)
    gx = _correlate3x3(image, _SOBEL_X, "nearest").long()
    gy = _correlate3x3(image, _SOBEL_X.T.contiguous(), "nearest").long()
    mag = gx.abs() + gy.abs()
    padded = F.pad(mag, (1, 1, 1, 1))  # zeros around, as OpenCV's magnitude buffer
    left, right = padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]
    up, down = padded[:, :-2, 1:-1], padded[:, 2:, 1:-1]
    up_left, up_right = padded[:, :-2, :-2], padded[:, :-2, 2:]
    down_left, down_right = padded[:, 2:, :-2], padded[:, 2:, 2:]
    ax, ay = gx.abs(), gy.abs() << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    same_sign = (gx ^ gy) >= 0
    diagonal_max = torch.where(same_sign, (mag > up_left) & (mag > down_right), (mag > up_right) & (mag > down_left))
    is_max = torch.where(horizontal, (mag > left) & (mag >= right),
                         torch.where(vertical, (mag > up) & (mag >= down), diagonal_max))
    candidate = is_max & (mag > low_i)
    edges = candidate & (mag > high_i)
    while True:
        grown = candidate & (F.max_pool2d(edges[:, None].float(), 3, 1, 1)[:, 0] > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown | edges


def distance_transform(zero: torch.Tensor, cap: float) -> torch.Tensor:
    """``cv2.distanceTransform(src, DIST_L2, 5)`` truncated at ``cap`` (``cv2.threshold(..., TRUNC)``): distance
    of every pixel to the nearest ``zero`` pixel with the 5x5 chamfer weights (1, 1.4, 2.1969) in OpenCV's
    16-bit fixed point, float32 (N, H, W). OpenCV's two raster passes give the shortest chamfer path; we reach
    the same values by parallel relaxation, stopped once nothing changes or every path up to ``cap`` is found.
    """
    n, h, w = zero.shape
    big = 1 << 40
    dist = torch.where(zero, torch.zeros((), dtype=torch.long, device=zero.device),
                       torch.full((), big, dtype=torch.long, device=zero.device))
    for _ in range(int(cap) + 2):
        before = dist
        for dy, dx, weight in _CHAMFER_5x5:
            padded = F.pad(dist, (2, 2, 2, 2), value=big)
            shifted = padded[:, 2 + dy:2 + dy + h, 2 + dx:2 + dx + w]
            dist = torch.minimum(dist, shifted + weight)
        if torch.equal(dist, before):
            break
    return (dist.to(torch.float64) / (1 << _DIST_SHIFT)).clamp(max=cap).to(torch.float32)


def box3_float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``cv2.blur(x_float32, (3, 3)).astype(np.uint8)``: 3x3 mean (sum in double times 1/9, rounded to float32;
    BORDER_REFLECT_101), then truncated to an integer."""
    total = _correlate3x3(x, torch.ones(3, 3, dtype=torch.float64), "mirror")
    return torch.trunc((total * (1.0 / 9.0)).to(torch.float32)).long().clamp(0, 255)


def box3_uint8(x: torch.Tensor) -> torch.Tensor:
    """``cv2.blur(x_uint8, (3, 3))``: 3x3 mean of integers, rounded (never a tie for 9 taps), BORDER_REFLECT_101."""
    total = _correlate3x3(x, torch.ones(3, 3, dtype=torch.float64), "mirror")
    return torch.round(total / 9.0).long()


def filter2d_uint8(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``cv2.filter2D(x_uint8, cv2.CV_8U, kernel)`` for an integer 3x3 kernel: correlation with
    BORDER_REFLECT_101, saturated to 0..255."""
    return _correlate3x3(x, kernel, "mirror").round().long().clamp(0, 255)


def equalize_hist(x: torch.Tensor) -> torch.Tensor:
    """``cv2.equalizeHist`` per image: LUT ``round(cumulative count above the lowest used level * 255 /
    (pixels - count of that level))`` in float32 as OpenCV, the lowest used level mapped to 0; an image of a
    single level stays unchanged."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    total = flat.shape[1]
    hist = torch.zeros(n, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).long().argmax(dim=1, keepdim=True)
    first_count = hist.gather(1, first)
    cumulative = hist.cumsum(dim=1) - hist.cumsum(dim=1).gather(1, first)  # counts in (first, j]
    scale = torch.tensor(255.0, dtype=torch.float32) / (total - first_count).clamp(min=1).to(torch.float32)
    lut = torch.round(cumulative.to(torch.float32) * scale).clamp(0, 255).long()
    single = first_count == total
    lut = torch.where(single, torch.arange(256, device=x.device).expand(n, 256), lut)
    return lut.gather(1, flat).reshape(x.shape)
