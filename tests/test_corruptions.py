"""The corruption generator (streams.corruptions): contract, seeding, hand-computed values, agreement with the
per-image numpy/scipy/scikit-image reference (benchmarks/reference_corruptions.py), and input errors."""
from __future__ import annotations

import importlib.util
import io
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streams
from streams import corruption_cv as cv
from streams import corruption_ops as ops
from streams import corruption_photos as photos
from streams import corruptions as C
from streams.corruption_params import PARAM_SETS, zoom_factors

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
ALL = C.CORRUPTIONS + C.EXTRA_CORRUPTIONS
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform", "spatter")
DETERMINISTIC = tuple(n for n in ALL if n not in RANDOM)
FROST_DIR = SHARED_DATA / "frost"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded, as the reference: on a shared 2-core machine OpenMP's two-thread regions around these
    small tensor ops wait on each other (measured: up to 30x slower under load), making runtimes erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_reference():
    path = REPO / "benchmarks" / "reference_corruptions.py"
    spec = importlib.util.spec_from_file_location("reference_corruptions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = _load_reference()


def _cifar_images(n: int) -> np.ndarray | None:
    archive = SHARED_DATA / "cifar10" / "cifar10-jpeg.zip"
    if not archive.is_file():
        return None
    from PIL import Image

    with zipfile.ZipFile(archive) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith("test/") and m.endswith(".jpg"))
        picked = names[::len(names) // n][:n]  # spread over the 10 classes
        return np.stack([np.asarray(Image.open(io.BytesIO(zf.read(m))).convert("RGB")) for m in picked]) / 255.0


def _synthetic_images(n: int, size: int = 32) -> np.ndarray:
    """Smooth deterministic colour images on the 8-bit grid (stand-ins when the CIFAR zip is absent)."""
    g = torch.Generator().manual_seed(1234)
    noise = torch.rand(n, 3, size + 8, size + 8, generator=g, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool2d(noise, 9, 1)
    lo, hi = smooth.amin(dim=(1, 2, 3), keepdim=True), smooth.amax(dim=(1, 2, 3), keepdim=True)
    return (torch.round((smooth - lo) / (hi - lo) * 255) / 255).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def images_np() -> np.ndarray:
    """8 real CIFAR-10 test images (HWC float64 on the 8-bit grid) when the shared data is there, else synthetic."""
    real = _cifar_images(8)
    return real if real is not None else _synthetic_images(8)


@pytest.fixture(scope="module")
def images(images_np) -> torch.Tensor:
    return torch.from_numpy(images_np).permute(0, 3, 1, 2).to(torch.float32).contiguous()


@pytest.fixture(scope="module")
def real_images() -> torch.Tensor:
    real = _cifar_images(16)
    if real is None:
        pytest.skip(f"CIFAR-10 zip not found under {SHARED_DATA} (severity ordering is measured on real images)")
    return torch.from_numpy(real).permute(0, 3, 1, 2).to(torch.float32).contiguous()


def _frost_kw(name: str) -> dict:
    if name != "frost":
        return {}
    if not (FROST_DIR / "frost1.png").is_file():
        pytest.skip(f"frost photographs not found at {FROST_DIR}")
    return {"frost_dir": FROST_DIR}


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).to(torch.float64).numpy()


def _grey(n: int, size: int, value: float = 0.5) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


# ------------------------------------------------------------------------------------------------ contract
def test_names_and_tables():
    assert C.CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                             "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                             "elastic_transform", "pixelate", "jpeg_compression")
    assert C.EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert streams.CORRUPTIONS is C.CORRUPTIONS and streams.corrupt is C.corrupt
    for param_set in PARAM_SETS.values():
        assert set(param_set.severities) == set(ALL)
        assert all(len(v) == 5 for v in param_set.severities.values())
    # the METHODS.md table at 32 px, spot-checked
    cifar = PARAM_SETS["cifar"].severities
    assert cifar["gaussian_noise"] == (.04, .06, .08, .09, .10) and cifar["jpeg_compression"] == (80, 65, 58, 50, 40)
    assert cifar["elastic_transform"][1] == pytest.approx((32 * .05, 32 * .2, 32 * .07))
    assert PARAM_SETS["imagenet"].severities["gaussian_noise"] == (.08, .12, .18, .26, .38)


def test_zoom_factors_match_numpy_arange():
    for param_set in PARAM_SETS.values():
        for entry in param_set.severities["zoom_blur"]:
            assert np.array_equal(np.arange(*entry), np.array(zoom_factors(*entry)))
    assert len(zoom_factors(1, 1.06, .01)) == 7  # numpy includes 1.06 here: 7 zooms at CIFAR severity 1


@pytest.mark.parametrize("name", ALL)
def test_every_severity_keeps_shape_dtype_range_and_changes_the_image(name, images):
    kw = _frost_kw(name)
    for severity in range(1, 6):
        y = streams.corrupt(images, name, severity, seed=3, **kw)
        assert y.shape == images.shape and y.dtype == images.dtype and y.device == images.device
        assert float(y.min()) >= 0 and float(y.max()) <= 1 and not torch.isnan(y).any()
        change = (y - images).abs().mean(dim=(1, 2, 3))
        # every corruption changes the batch; per image, spatter may leave an image untouched when no liquid
        # crosses the threshold (a legitimate identity), all others change every image
        assert float(change.mean()) > 1e-3, (name, severity)
        if name != "spatter":
            assert bool((change > 1e-4).all()), (name, severity, change)


def test_float64_and_float16_inputs_keep_their_dtype(images):
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = images.to(dtype)
        y = streams.corrupt(x, "defocus_blur", 2)
        assert y.dtype == dtype and y.shape == x.shape
        ref = streams.corrupt(images, "defocus_blur", 2)
        assert torch.allclose(y.float(), ref, atol=1e-2)


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
                                  "zoom_blur", "gaussian_blur"])
def test_severity_strictly_increases_the_change_noise_and_blur(name, real_images):
    changes = [float((streams.corrupt(real_images, name, s, seed=0) - real_images).abs().mean()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(changes, changes[1:])), changes


def test_severity_ordering_motion_and_glass_blur(real_images):
    """Measured on the original parameters: motion blur severities 3 (6, 2) and 4 (8, 2) have the same sigma, and
    taps beyond 3 sigma weigh nothing, so they blur alike; glass blur is ordered by its shuffle passes (1 for
    severities 1-3, 2 for 4-5), not by sigma. Both are facts of the published table, not of this code."""
    motion = [float((streams.corrupt(real_images, "motion_blur", s, seed=0) - real_images).abs().mean())
              for s in range(1, 6)]
    assert motion[0] < motion[1] < motion[2] < motion[4]
    assert motion[3] == pytest.approx(motion[2], rel=1e-3)
    glass = [float((streams.corrupt(real_images, "glass_blur", s, seed=0) - real_images).abs().mean())
             for s in range(1, 6)]
    assert min(glass[3:]) > 1.3 * max(glass[:3])


# ------------------------------------------------------------------------------------------------ seeding
@pytest.mark.parametrize("name", ALL)
def test_seed_reproducible_and_seed_sensitive(name, images):
    kw = _frost_kw(name)
    a = streams.corrupt(images, name, 4, seed=11, **kw)
    b = streams.corrupt(images, name, 4, seed=11, **kw)
    assert torch.equal(a, b)
    c = streams.corrupt(images, name, 4, seed=12, **kw)
    if name in RANDOM:
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)


def test_no_global_rng_is_touched(images):
    torch.manual_seed(0)
    np.random.seed(0)
    before_torch, before_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    streams.corrupt(images, "glass_blur", 5, seed=1)
    streams.corrupt(images, "shot_noise", 5, seed=1)
    assert torch.equal(before_torch, torch.get_rng_state())
    assert np.array_equal(before_np, np.random.get_state()[1])


# ------------------------------------------------------------------------------------------------ hand values
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_std_is_sigma(severity):
    x = _grey(16, 32)
    sigma = PARAM_SETS["cifar"].severities["gaussian_noise"][severity - 1]
    d = (streams.corrupt(x, "gaussian_noise", severity, seed=0) - x).double()
    assert float(d.std()) == pytest.approx(sigma, rel=0.02)  # 49152 draws: std error ~0.3 %
    assert abs(float(d.mean())) < 4 * sigma / math.sqrt(d.numel())


def test_shot_noise_keeps_the_mean_and_has_poisson_variance():
    x = _grey(16, 32, 0.4)
    for severity, c in enumerate(PARAM_SETS["cifar"].severities["shot_noise"], start=1):
        y = streams.corrupt(x, "shot_noise", severity, seed=1).double()
        assert float(y.mean()) == pytest.approx(0.4, abs=4 * math.sqrt(0.4 / c / y.numel()) + 1e-6)
        assert float(y.var()) == pytest.approx(0.4 / c, rel=0.03)
        assert torch.allclose(y * c, torch.round(y * c), atol=1e-4)  # multiples of 1/c


def test_impulse_noise_salt_and_pepper_fractions():
    x = _grey(16, 32)
    amount = PARAM_SETS["cifar"].severities["impulse_noise"][4]
    y = streams.corrupt(x, "impulse_noise", 5, seed=2)
    salt, pepper = float((y == 1).double().mean()), float((y == 0).double().mean())
    assert salt == pytest.approx(amount / 2, rel=0.1) and pepper == pytest.approx(amount / 2, rel=0.1)
    assert bool(((y == 0) | (y == 1) | (y == 0.5)).all())


def test_speckle_noise_is_multiplicative():
    x = _grey(16, 32, 0.3)
    sigma = PARAM_SETS["cifar"].severities["speckle_noise"][4]
    d = (streams.corrupt(x, "speckle_noise", 5, seed=0) - x).double() / 0.3
    assert float(d.std()) == pytest.approx(sigma, rel=0.02)
    black = torch.zeros(2, 3, 32, 32)
    assert torch.equal(streams.corrupt(black, "speckle_noise", 5), black)


def test_contrast_and_brightness_direct_formulas(images):
    for severity, c in enumerate(PARAM_SETS["cifar"].severities["contrast"], start=1):
        mean = images.mean(dim=(2, 3), keepdim=True)
        expected = ((images - mean) * c + mean).clamp(0, 1)
        assert torch.allclose(streams.corrupt(images, "contrast", severity), expected, atol=1e-6)
    # brightness adds c to V = max(R, G, B); hue and saturation stay, so RGB scales by min(V + c, 1) / V
    for severity, c in enumerate(PARAM_SETS["cifar"].severities["brightness"], start=1):
        v = images.amax(dim=1, keepdim=True)
        expected = torch.where(v > 0, images * (v + c).clamp(max=1) / v.clamp(min=1e-12), torch.full_like(images, c))
        assert torch.allclose(streams.corrupt(images, "brightness", severity), expected, atol=2e-6)


def test_saturate_on_grey_pixels():
    x = _grey(1, 32, 0.6)
    # severities 1-3 multiply S = 0: grey stays grey
    for severity in (1, 2, 3):
        assert torch.allclose(streams.corrupt(x, "saturate", severity), x, atol=1e-7)
    # severity 4 adds 0.1 to S with hue 0: (v, v(1 - s), v(1 - s))
    y = streams.corrupt(x, "saturate", 4)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.6, 0.54, 0.54]), atol=1e-6)


def test_pixelate_by_hand_on_a_4x4_image():
    a, b, c, d = 0.1, 0.3, 0.6, 1.0
    row = torch.tensor([a, b, c, d])
    x = (row[None, :] * torch.tensor([1.0, 0.5, 0.25, 0.0])[:, None] + row[:, None] * 0.0).expand(1, 3, 4, 4)
    x = x.contiguous()
    # c = .95: Pillow BOX 4 -> int(3.8) = 3 keeps pixels 0 and 3 and averages 1 and 2; 3 -> 4 repeats the middle
    one_d = lambda v: torch.stack([v[0], (v[1] + v[2]) / 2, (v[1] + v[2]) / 2, v[3]])  # noqa: E731
    expected = one_d(one_d(x[0, 0]).T).T
    assert torch.allclose(streams.corrupt(x, "pixelate", 1, params="cifar")[0, 0], expected, atol=1e-6)
    # c = .65: 4 -> int(2.6) = 2 averages pairs; 2 -> 4 repeats them: 2x2 block means
    blocks = x[0, 0].reshape(2, 2, 2, 2).mean(dim=(1, 3)).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.allclose(streams.corrupt(x, "pixelate", 5, params="cifar")[0, 0], blocks, atol=1e-6)


def test_fog_on_a_constant_image_spans_the_formula():
    v, strength = 0.5, PARAM_SETS["cifar"].severities["fog"][2][0]
    y = streams.corrupt(_grey(4, 32, v), "fog", 3, seed=5)
    # plasma spans [0, 1] over the 32x32 map: out = (v + s * plasma) * v / (v + s)
    assert torch.allclose(y.amin(dim=(1, 2, 3)), torch.full((4,), v * v / (v + strength)), atol=1e-6)
    assert torch.allclose(y.amax(dim=(1, 2, 3)), torch.full((4,), v), atol=1e-6)
    assert torch.equal(y[:, 0], y[:, 1])  # the same fog on every channel


def test_frost_adds_a_crop_of_a_resized_photo(frost_dir):
    weight = PARAM_SETS["cifar"].severities["frost"][1][1]
    y = streams.corrupt(torch.zeros(6, 3, 32, 32), "frost", 2, seed=9, frost_dir=frost_dir)
    stacked, sizes = photos.frost_photos(frost_dir, 0.2)
    assert sizes.tolist()[:2] == [[120, 180], [63, 112]]  # cv2.resize(fx=0.2): 900x600 -> 180x120, 560x315 -> 112x63
    levels = torch.round(y / weight * 255)
    assert torch.allclose(levels * weight / 255, y, atol=1e-5)  # the crop is 8-bit, scaled by the frost weight
    for crop in levels.to(torch.uint8):
        found = False
        for k, (ph, pw) in enumerate(sizes.tolist()):  # candidates: where the crop's first row matches
            rows = stacked[k, :, :ph - 32, :pw].unfold(2, 32, 1)  # (3, r, c, 32)
            for r, col in (rows == crop[:, None, None, 0]).all(dim=-1).all(dim=0).nonzero().tolist():
                found = found or torch.equal(stacked[k, :, r:r + 32, col:col + 32], crop)
        assert found


def test_frost_photos_are_cached(frost_dir):
    photos.frost_photos(frost_dir, 0.2)
    before = photos._load.cache_info().hits
    streams.corrupt(torch.zeros(1, 3, 32, 32), "frost", 1, frost_dir=frost_dir)
    assert photos._load.cache_info().hits == before + 1


def test_motion_blur_kernel_by_hand():
    """Angle 0: out[y, x] = sum_i w_i x[y, x + i] with w_i ~ exp(-i^2 / (2 sigma^2)), i = 0 .. 2 * radius."""
    x = torch.zeros(1, 1, 9, 20)
    x[0, 0, 4, 15] = 1.0
    y = ops.motion_blur(x, 3, 1.5, torch.zeros(1))
    w = torch.exp(-torch.arange(7.0) ** 2 / (2 * 1.5 ** 2))
    w = w / w.sum()
    assert torch.allclose(y[0, 0, 4, 9:16], w.flip(0), atol=1e-6)
    assert float(y.sum()) == pytest.approx(1.0) and float(y[0, 0, :4].abs().sum()) == 0.0
    # angle 90 (y axis down): the trail runs along the rows
    y90 = ops.motion_blur(x, 3, 1.5, torch.full((1,), 90.0))
    assert torch.allclose(y90[0, 0, :5, 15], w.flip(0)[2:], atol=1e-6)


def test_disk_kernel_matches_reference():
    for param_set in PARAM_SETS.values():
        for radius, alias in param_set.severities["defocus_blur"]:
            ours = ops.disk_kernel(radius, alias).numpy()
            ref = R.disk(radius, alias)
            pad = (ref.shape[0] - ours.shape[0]) // 2
            core = ref[pad:ref.shape[0] - pad, pad:ref.shape[1] - pad] if pad else ref
            assert np.allclose(ours, core, atol=1e-7) and ref.sum() - core.sum() < 1e-9


def test_distance_transform_chamfer_values_by_hand():
    zero = torch.zeros(1, 9, 9, dtype=torch.bool)
    zero[0, 4, 4] = True
    d = cv.distance_transform(zero, 20)[0]
    assert float(d[4, 5]) == 1.0 and float(d[5, 5]) == pytest.approx(91750 / 65536)
    assert float(d[5, 6]) == pytest.approx(143976 / 65536) and float(d[6, 6]) == pytest.approx(2 * 91750 / 65536)
    assert float(d[4, 8]) == 4.0
    assert float(cv.distance_transform(torch.zeros(1, 5, 5, dtype=torch.bool), 20).max()) == 20.0  # no zero: cap


def test_equalize_hist_and_canny_match_numpy_versions():
    g = torch.Generator().manual_seed(0)
    image = (torch.nn.functional.avg_pool2d(torch.rand(3, 1, 40, 40, generator=g), 5, 1)[:, 0] * 255).long()
    for i in range(3):
        assert np.array_equal(cv.equalize_hist(image[i:i + 1])[0].numpy(), R.equalize_hist_np(image[i].numpy()))
        assert np.array_equal(cv.canny(image[i:i + 1], 50, 150)[0].numpy(),
                              R.canny_np(image[i].numpy().astype(np.uint8), 50, 150))
    flat = torch.full((1, 6, 6), 7)
    assert torch.equal(cv.equalize_hist(flat), flat)


# ------------------------------------------------------------------------------------------------ glass blur
def _literal_glass(height, width, delta, draws):
    """The reference's loop on an index image (H, W, 1 channel kept as a view: copy semantics)."""
    index = np.arange(height * width).reshape(height, width, 1).repeat(3, axis=2)
    for it in range(draws.shape[0]):
        k = 0
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                dx, dy = (int(v) for v in draws[it, k])
                k += 1
                index[h, w], index[h + dy, w + dx] = index[h + dy, w + dx], index[h, w]
    return index[:, :, 0].reshape(-1)


@settings(max_examples=25, deadline=None)
@given(height=st.integers(4, 14), width=st.integers(4, 14), delta=st.integers(1, 3),
       iterations=st.integers(1, 3), seed=st.integers(0, 2 ** 31 - 1))
def test_glass_shuffle_equals_the_sequential_loop(height, width, delta, iterations, seed):
    visited = len(range(height - delta, delta, -1)) * len(range(width - delta, delta, -1))
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(-delta, delta, (2, iterations, visited, 2), generator=g)
    ours = ops.glass_shuffle_index(height, width, delta, draws)
    for n in range(2):
        assert np.array_equal(ours[n].numpy(), _literal_glass(height, width, delta, draws[n].numpy()))


# ------------------------------------------------------------------------------------------------ reference
@pytest.mark.parametrize("name,tolerance", [
    ("contrast", 1e-6), ("brightness", 2e-6), ("saturate", 2e-6), ("defocus_blur", 1e-6), ("gaussian_blur", 1e-6),
    ("zoom_blur", 2e-6), ("jpeg_compression", 0.0), ("pixelate", 1 / 255 + 1e-6)])
def test_deterministic_corruptions_agree_with_reference(name, tolerance, images, images_np):
    """float32 vs float64 accounts for ~1e-6; pixelate: Pillow rounds to 8 bits after each of its two passes (we
    do not), at most one level; JPEG: both sides run the same libjpeg on the same 8-bit input, so the 8-bit
    levels are equal."""
    rng = np.random.default_rng(0)
    for severity in range(1, 6):
        ours = _nhwc(streams.corrupt(images, name, severity))
        ref = np.stack([R.REFERENCES[name](im, severity, rng) for im in images_np])
        if name == "jpeg_compression":
            ours, ref = np.round(ours * 255), np.round(ref * 255)
        assert np.abs(ours - ref).max() <= tolerance, (name, severity, np.abs(ours - ref).max())


@dataclass(frozen=True)
class Scripted(C.Context):
    """A context that hands out prepared random numbers, so both implementations see the same draws."""

    queue: list = field(default_factory=list)

    def rand(self, *shape, like=None, dtype=torch.float64):
        value = self.queue.pop(0)
        assert tuple(value.shape) == shape
        return value.to(dtype) if like is None else value.to(like.device, like.dtype)

    randn = rand

    def randint(self, low, high, *shape):
        value = self.queue.pop(0)
        assert tuple(value.shape) == shape
        return value


def _scripted(name, severity, x, queue):
    ctx = Scripted(PARAM_SETS["cifar"], torch.Generator(), None, list(queue))
    out = C._FUNCTIONS[name](x, PARAM_SETS["cifar"].severities[name][severity - 1], ctx).clamp(0, 1)
    assert not ctx.queue
    return _nhwc(out)


def test_random_corruptions_agree_with_reference_given_the_same_draws(images, images_np):
    x, xs = images[:4], images_np[:4]
    n, rng = len(xs), np.random.default_rng(0)
    g = torch.Generator().manual_seed(7)
    for s in range(1, 6):
        u = torch.rand(n, generator=g, dtype=torch.float64)
        ours = _scripted("motion_blur", s, x, [u])
        ref = np.stack([R.motion_blur(im, s, rng, angle=float(u[i] * 90 - 45)) for i, im in enumerate(xs)])
        assert np.abs(ours - ref).max() < 2e-6, ("motion_blur", s)

        loc, scale = PARAM_SETS["cifar"].severities["snow"][s - 1][:2]
        z, u = torch.randn(n, 1, 32, 32, generator=g, dtype=torch.float64), torch.rand(n, generator=g,
                                                                                       dtype=torch.float64)
        ours = _scripted("snow", s, x, [z, u])
        ref = np.stack([R.snow(im, s, rng, layer=(z[i, 0] * scale + loc).numpy(), angle=float(u[i] * 90 - 135))
                        for i, im in enumerate(xs)])
        assert np.abs(ours - ref).max() < 2e-6, ("snow", s)

        alpha, _, jitter = PARAM_SETS["cifar"].severities["elastic_transform"][s - 1]
        j = torch.rand(n, 3, 2, generator=g, dtype=torch.float64)
        f1, f2 = (torch.rand(n, 32, 32, generator=g, dtype=torch.float64) for _ in range(2))
        ours = _scripted("elastic_transform", s, x, [j] + ([f1, f2] if alpha else []))
        ref = np.stack([R.elastic_transform(im, s, rng, jitter=(j[i] * 2 * jitter - jitter).numpy(),
                                            fields=((f1[i] * 2 - 1).numpy(), (f2[i] * 2 - 1).numpy()))
                        for i, im in enumerate(xs)])
        assert np.abs(ours - ref).max() < 2e-6, ("elastic_transform", s)

        loc, scale, *_ , mud = PARAM_SETS["cifar"].severities["spatter"][s - 1]
        if mud:  # water drops: the reference swaps OpenCV's chamfer distance for scipy's exact one
            z = torch.randn(n, 32, 32, generator=g, dtype=torch.float64)
            ours = _scripted("spatter", s, x, [z])
            ref = np.stack([R.spatter(im, s, rng, layer=(z[i] * scale + loc).numpy()) for i, im in enumerate(xs)])
            assert np.abs(ours - ref).max() < 2e-6, ("spatter", s)


def test_glass_blur_agrees_with_reference_given_the_same_draws(images, images_np):
    """The shuffle is exact (test above); values differ only where float-equal blurs of 8-bit images truncate
    to neighbouring 8-bit levels (scipy and our filter sum in different orders): at most one level, rarely."""
    x, xs = images[:2], images_np[:2]
    g = torch.Generator().manual_seed(3)
    for s in range(1, 6):
        _, delta, iterations = PARAM_SETS["cifar"].severities["glass_blur"][s - 1]
        visited = len(range(32 - delta, delta, -1)) ** 2
        draws = torch.randint(-delta, delta, (2, iterations, visited, 2), generator=g, dtype=torch.int16)
        ours = _scripted("glass_blur", s, x, [draws])
        ref = np.stack([R.glass_blur(im, s, None, displacements=draws[i].numpy()) for i, im in enumerate(xs)])
        diff = np.abs(ours - ref)
        assert diff.max() <= 1 / 255 + 1e-6 and (diff > 1e-5).mean() < 0.05, (s, diff.max(), (diff > 1e-5).mean())


def test_plasma_fractal_equals_reference_on_the_same_uniforms():
    class SameUniforms:
        def __init__(self, seed):
            self.g = torch.Generator().manual_seed(seed)

        def uniform(self, low, high, shape):
            return (torch.rand(shape, generator=self.g, dtype=torch.float64) * (high - low) + low).numpy()

    for decay in (3, 1.75):
        g = torch.Generator().manual_seed(4)
        ours = ops.plasma_fractal(1, 32, decay, lambda *shape: torch.rand(shape, generator=g, dtype=torch.float64))
        assert np.array_equal(ours[0].numpy(), R.plasma_fractal(SameUniforms(4), 32, decay))


# ------------------------------------------------------------------------------------------------ other sizes
@pytest.mark.parametrize("size,params,sigma", [(32, "cifar", .06), (64, "tiny", .08), (224, "imagenet", .12)])
def test_parameter_set_follows_the_image_size(size, params, sigma):
    x = _grey(2, size)
    d = (streams.corrupt(x, "gaussian_noise", 2, seed=0) - x).double()
    assert float(d.std()) == pytest.approx(sigma, rel=0.03)
    assert torch.equal(streams.corrupt(x, "gaussian_noise", 2, seed=0),
                       streams.corrupt(x, "gaussian_noise", 2, seed=0, params=params))
    # an explicit table wins over the size
    y = streams.corrupt(_grey(16, 32), "gaussian_noise", 2, seed=0, params="imagenet") - 0.5
    assert float(y.double().std()) == pytest.approx(.12, rel=0.03)


@pytest.mark.parametrize("size,severity", [(64, 3), (224, 5)])
def test_every_corruption_runs_at_64_and_224_px(size, severity):
    x = torch.from_numpy(_synthetic_images(1, size)).permute(0, 3, 1, 2).float().contiguous()
    for name in ALL:
        if name == "frost" and not (FROST_DIR / "frost1.png").is_file():
            continue
        y = streams.corrupt(x, name, severity, seed=0, frost_dir=FROST_DIR if name == "frost" else None)
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
        assert float((y - x).abs().mean()) > 1e-3, (name, size)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3), height=st.integers(8, 32), width=st.integers(8, 32),
       name=st.sampled_from([c for c in ALL if c != "frost"]), severity=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
def test_any_size_with_explicit_params(n, height, width, name, severity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, height, width, generator=g, dtype=dtype)
    y = streams.corrupt(x, name, severity, seed=seed, params="cifar")
    assert y.shape == x.shape and y.dtype == dtype
    assert float(y.min()) >= 0 and float(y.max()) <= 1 and not torch.isnan(y).any()
    assert torch.equal(y, streams.corrupt(x, name, severity, seed=seed, params="cifar"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name, images):
    kw = _frost_kw(name)
    cpu = streams.corrupt(images, name, 3, seed=1, **kw)
    gpu = streams.corrupt(images.cuda(), name, 3, seed=1, **kw)
    assert gpu.device.type == "cuda"
    tolerance = 1 / 255 + 1e-5 if name in ("glass_blur", "spatter") else 1e-4
    assert (gpu.cpu() - cpu).abs().max() <= tolerance


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors(images):
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        streams.corrupt(images, "fogg")
    for severity in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
            streams.corrupt(images, "fog", severity)
    with pytest.raises(ValueError, match="float tensor"):
        streams.corrupt((images * 255).to(torch.uint8), "fog")
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        streams.corrupt(images[0], "fog")
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        streams.corrupt(images[:, :1], "fog")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        streams.corrupt(images * 255, "fog")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        streams.corrupt(images - 0.5, "fog")
    nan = images.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        streams.corrupt(nan, "fog")
    with pytest.raises(TypeError, match="torch.Tensor"):
        streams.corrupt(images.numpy(), "fog")
    for seed in (2 ** 64, 1.5, None):
        with pytest.raises(ValueError, match="seed must be an integer"):
            streams.corrupt(images, "fog", 1, seed=seed)
    assert streams.corrupt(images[:1], "fog", 1, seed=np.int64(3)).shape == (1, 3, 32, 32)


def test_params_errors():
    with pytest.raises(ValueError, match=r"48x48.*pass params="):
        streams.corrupt(torch.rand(1, 3, 48, 48), "contrast")
    with pytest.raises(ValueError, match=r"32x40.*pass params="):
        streams.corrupt(torch.rand(1, 3, 32, 40), "contrast")
    with pytest.raises(ValueError, match="unknown params 'mnist'"):
        streams.corrupt(torch.rand(1, 3, 32, 32), "contrast", params="mnist")
    with pytest.raises(ValueError, match=r"fog with params='cifar' draws a 32x32 plasma map"):
        streams.corrupt(torch.rand(1, 3, 64, 64), "fog", params="cifar")
    assert streams.corrupt(torch.rand(1, 3, 48, 48), "contrast", params="tiny").shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match="at least 3x3"):
        streams.corrupt(torch.rand(1, 3, 2, 2), "elastic_transform", params="cifar")


def test_frost_errors(tmp_path, monkeypatch, frost_dir):
    with pytest.raises(ValueError, match=r"frost with params='cifar' crops 224x224.*smallest of which is 63x105"):
        streams.corrupt(torch.rand(1, 3, 224, 224), "frost", params="cifar", frost_dir=frost_dir)
    with pytest.raises(FileNotFoundError, match="frost1.png"):
        streams.corrupt(torch.rand(1, 3, 32, 32), "frost", frost_dir=tmp_path)
    monkeypatch.setenv(photos.FROST_ENV, str(frost_dir))
    assert streams.corrupt(torch.rand(1, 3, 32, 32), "frost").shape == (1, 3, 32, 32)
    monkeypatch.delenv(photos.FROST_ENV)
    monkeypatch.setattr(photos, "_package_frost_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"frost_dir=PATH.*TTA_FROST_DIR.*pip install 'tta-runtime\[frost\]'"):
        streams.corrupt(torch.rand(1, 3, 32, 32), "frost")


def test_empty_batch():
    x = torch.rand(0, 3, 32, 32)
    assert streams.corrupt(x, "glass_blur").shape == (0, 3, 32, 32)
