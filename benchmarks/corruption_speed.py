"""Speed of ``streams.corrupt`` against straightforward per-image numpy/scipy/scikit-image versions of the same
algorithms and parameters (``benchmarks/reference_corruptions.py``), at 32 px, severity 5.

    .venv/bin/python benchmarks/corruption_speed.py [--n 1000] [--ref-n N] [--threads T] [--out FILE]

Images: CIFAR-10 test images from ../shared/data/cifar10/cifar10-jpeg.zip when present (a seeded sample), else
smooth synthetic images. Ours: the whole batch in one ``corrupt`` call per corruption (after a warm-up call on 8
images; best of ``--repeats`` runs). Reference: one image at a time, as the original ``make_cifar_c.py`` runs
(over the first ``--ref-n`` images). Prints a table (ms per image, speedup) and the overall speedup over the 15
benchmark corruptions (total reference time / total time of ours); ``--out`` also writes it as Markdown.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_corruptions as reference  # noqa: E402
from streams.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TTA_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_images(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, 32, 32, 3) float64 in [0, 1]: CIFAR-10 test images if available, else smooth random images."""
    archive = SHARED / "cifar10" / "cifar10-jpeg.zip"
    if archive.is_file():
        from PIL import Image

        with zipfile.ZipFile(archive) as zf:
            names = sorted(m for m in zf.namelist() if m.startswith("test/") and m.endswith(".jpg"))
            order = np.random.default_rng(seed).permutation(len(names))[:n]
            images = [np.asarray(Image.open(io.BytesIO(zf.read(names[i]))).convert("RGB")) for i in order]
        return np.stack(images) / 255.0, f"CIFAR-10 test images from {archive}"
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, 3, 40, 40, generator=generator, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool2d(noise, 9, 1)
    smooth = (smooth - smooth.amin(dim=(1, 2, 3), keepdim=True)) / (smooth.amax(dim=(1, 2, 3), keepdim=True)
                                                                      - smooth.amin(dim=(1, 2, 3), keepdim=True))
    return smooth.permute(0, 2, 3, 1).numpy(), "synthetic smooth images (CIFAR-10 zip not found)"


def time_ours(x: torch.Tensor, name: str, repeats: int, frost_dir: str | None) -> float:
    corrupt(x[:8], name, 5, seed=0, frost_dir=frost_dir)  # warm-up: caches, kernels, photos
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        corrupt(x, name, 5, seed=r, frost_dir=frost_dir)
        best = min(best, time.perf_counter() - start)
    return best / len(x) * 1e3


def time_reference(images: np.ndarray, name: str, frost_dir: str | None) -> float:
    function = reference.REFERENCES[name]
    kwargs = {"frost_dir": frost_dir} if name == "frost" else {}
    rng = np.random.default_rng(0)
    function(images[0], 5, rng, **kwargs)  # warm-up (frost photos are read once, as ours caches them)
    start = time.perf_counter()
    for image in images:
        function(image, 5, rng, **kwargs)
    return (time.perf_counter() - start) / len(images) * 1e3


def find_frost_dir(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("TTA_FROST_DIR"), str(SHARED / "frost")):
        if candidate and (Path(candidate) / "frost1.png").is_file():
            return candidate
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images corrupted by ours (one batch)")
    parser.add_argument("--ref-n", type=int, default=None, help="images run through the reference (default: n)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--frost-dir", default=None, help="frost photographs (default: $TTA_FROST_DIR, shared data)")
    parser.add_argument("--only", default=None, help="comma-separated corruptions (default: all 19)")
    parser.add_argument("--out", default=None, help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, source = load_images(args.n)
    ref_images = images[:args.ref_n or args.n]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32).contiguous()
    frost_dir = find_frost_dir(args.frost_dir)
    names = args.only.split(",") if args.only else list(CORRUPTIONS + EXTRA_CORRUPTIONS)

    rows = []
    for name in names:
        if name == "frost" and frost_dir is None:
            print("frost: skipped (no frost photographs found)", flush=True)
            continue
        ours = time_ours(x, name, args.repeats, frost_dir)
        ref = time_reference(ref_images, name, frost_dir)
        rows.append((name, ours, ref))
        print(f"{name:18s} ours {ours:8.4f} ms/image   reference {ref:8.4f} ms/image   speedup {ref / ours:7.1f}x",
              flush=True)

    lines = [f"N = {len(x)} images (reference: {len(ref_images)}), 32 px, severity 5; {source}",
             f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs, "
             f"{platform.processor() or platform.machine()}", "",
             "| corruption | ours ms/image | reference ms/image | speedup |", "|---|---:|---:|---:|"]
    for group, members in (("15 benchmark corruptions", CORRUPTIONS), ("4 extra corruptions", EXTRA_CORRUPTIONS)):
        chosen = [r for r in rows if r[0] in members]
        for name, ours, ref in chosen:
            lines.append(f"| {name} | {ours:.4f} | {ref:.4f} | {ref / ours:.1f}x |")
        if chosen:
            total_ours, total_ref = sum(r[1] for r in chosen), sum(r[2] for r in chosen)
            lines.append(f"| **total, {group}** | **{total_ours:.4f}** | **{total_ref:.4f}** | "
                         f"**{total_ref / total_ours:.1f}x** |")
            rest = [r for r in chosen if r[0] != "glass_blur"]
            if len(rest) < len(chosen) and rest:  # glass blur's pixel loop dominates the reference total
                rest_ours, rest_ref = sum(r[1] for r in rest), sum(r[2] for r in rest)
                lines.append(f"| total without glass_blur | {rest_ours:.4f} | {rest_ref:.4f} | "
                             f"{rest_ref / rest_ours:.1f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
