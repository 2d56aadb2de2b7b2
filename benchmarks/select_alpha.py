"""Choose alpha_bn's default alpha on the held-out VALIDATION corruptions only (never the 15 test corruptions).

Rule (fixed before looking at results): the alpha with the lowest error averaged over the 4 validation
corruptions (speckle_noise, gaussian_blur, spatter, saturate) at severity 5 and over batch sizes 16, 64 and 200
(small batches are where mixing in source statistics matters). Model: the pretrained CIFAR-10 ResNet-20; data:
a seeded subset of the CIFAR-10 JPEG test split (../shared/data). Writes a JSON file and prints a Markdown table.

    .venv/bin/python benchmarks/select_alpha.py --n-images 1000 --threads 1 --out docs/alpha_selection.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import streams
import tta
from eval.models import load_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "cifar10" / "cifar10-jpeg.zip"))
    parser.add_argument("--weights", default=str(DATA / "models" / "akamaster-resnet-cifar10" / "resnet20-12fca82f.th"))
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--alphas", default="0,0.05,0.1,0.2,0.3,0.5,0.7,1")
    parser.add_argument("--batch-sizes", default="16,64,200")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "docs" / "alpha_selection.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    alphas = [float(a) for a in args.alphas.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    data = streams.load_imagefolder(args.data, split="test")
    model = load_model("cifar10_resnet20", args.weights)
    errors: dict[str, dict[str, dict[str, float]]] = {}
    start = time.time()
    for batch_size in batch_sizes:
        protocol = streams.make_protocol("reset", corruptions="extra", severity=args.severity, batch_size=batch_size,
                                         seed=0, n_images=args.n_images)
        stream = streams.make_stream(data, protocol)
        for s, segment in enumerate(stream.segments):
            batches = list(stream.batches(s))  # corrupt once, reuse for every alpha
            for alpha in alphas:
                adapted = tta.adapt(model, "alpha_bn", alpha=alpha)
                wrong = sum(int((adapted(b.x).argmax(1) != b.y).sum()) for b in batches)
                model = adapted.release()
                n = sum(len(b.y) for b in batches)
                errors.setdefault(str(alpha), {}).setdefault(str(batch_size), {})[segment.name] = wrong / n
            print(f"batch {batch_size} {segment.name} done ({time.time() - start:.0f} s)", flush=True)
    mean = {a: sum(v for by_c in errors[a].values() for v in by_c.values()) / (len(batch_sizes) * 4) for a in errors}
    best = min(mean, key=mean.get)
    result = {"errors": errors, "mean_error": mean, "chosen_alpha": float(best), "rule": __doc__.split("\n\n")[1],
              "n_images": args.n_images, "severity": args.severity, "date": str(date.today()),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| alpha | " + " | ".join(f"batch {b}" for b in batch_sizes) + " | mean |")
    print("|---:|" + "---:|" * (len(batch_sizes) + 1))
    for a in errors:
        per_batch = [100 * sum(errors[a][str(b)].values()) / 4 for b in batch_sizes]
        print(f"| {a} | " + " | ".join(f"{v:.1f}" for v in per_batch) + f" | {100 * mean[a]:.1f} |")
    print(f"chosen alpha: {best}")


if __name__ == "__main__":
    main()
