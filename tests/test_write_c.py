"""``tta make-c``: the CIFAR-10-C layout round trip, robustbench's own loader on our output, resume, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.cli import main as tta_main
from streams import ImageDataset, load_cifar_c, load_digits
from streams.write_c import write_c


def severity_shift(x, corruption, severity, seed=0, params=None):
    """A fake corruption: +severity/255 (+1/255 more for 'fog'), exact after uint8 rounding."""
    return (x + (severity + (corruption == "fog")) / 255).clamp(0, 1)


def synthetic(n: int, size: int = 2, classes: int = 10) -> ImageDataset:
    """Class-sorted images whose pixels encode their index: red = index % 200, green = index // 200."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0] = (torch.arange(n) % 200).view(-1, 1, 1)
    images[:, 1] = (torch.arange(n) // 200).view(-1, 1, 1)
    labels = torch.arange(n) * classes // n
    return ImageDataset(images, labels, [f"k{i}" for i in range(classes)], "synthetic")


def _expected(dataset: ImageDataset, out, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """What load_cifar_c should give back: the written order (from labels.npy) and our fake corruption."""
    red = load_cifar_c(out, corruption, severity).images[:, 0, 0, 0].long()
    green = load_cifar_c(out, corruption, severity).images[:, 1, 0, 0].long()
    shift = severity + (corruption == "fog")
    index = (red - shift) + 200 * (green - shift)
    return index.numpy(), dataset.labels[index].numpy()


def test_round_trip_layout_and_order(tmp_path):
    data = synthetic(60)
    out = write_c(data, tmp_path / "c", corruptions="fog,snow", n_images=40, seed=1, batch_size=16,
                  corrupt_fn=severity_shift, progress=False)
    images = np.load(out / "fog.npy")
    labels = np.load(out / "labels.npy")
    assert images.shape == (200, 2, 2, 3) and images.dtype == np.uint8
    assert labels.shape == (200,) and labels.dtype == np.uint8 and np.array_equal(labels[:40], labels[160:])
    assert (out / "classes.txt").read_text().split() == data.classes
    assert json.loads((out / "make_c.json").read_text())["n_images"] == 40
    for corruption in ("fog", "snow"):
        for severity in (1, 3, 5):
            loaded = load_cifar_c(out, corruption, severity)
            index, expected_labels = _expected(data, out, corruption, severity)
            assert len(set(index.tolist())) == 40 and index.min() >= 0 and index.max() < 60  # a subset, once each
            assert np.array_equal(loaded.labels.numpy(), expected_labels)
            assert loaded.classes == data.classes
    index, _ = _expected(data, out, "fog", 1)
    assert not np.array_equal(np.sort(index), index)  # shuffled, not in (class-sorted) source order
    assert np.array_equal(_expected(data, out, "snow", 4)[0], index)  # same order for every corruption/severity


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_robustbench_loader_reads_our_output(tmp_path):
    from robustbench.data import load_cifar10c

    data = synthetic(10000)  # robustbench assumes 10000 images per severity
    out = write_c(data, tmp_path / "CIFAR-10-C", corruptions="fog,snow", seed=0, batch_size=5000,
                  corrupt_fn=severity_shift, progress=False)
    for severity in (1, 2, 5):
        x, y = load_cifar10c(n_examples=300, severity=severity, data_dir=str(tmp_path), corruptions=["snow"])
        ours = load_cifar_c(out, "snow", severity, n=300)
        assert x.shape == (300, 3, 2, 2) and x.dtype == torch.float32
        assert torch.equal((x * 255).round().to(torch.uint8), ours.images)
        assert torch.equal(y.long(), ours.labels)
        assert torch.equal(ours.images[:, 0, 0, 0].long() - severity, ours.images[:, 0, 1, 1].long() - severity)
    # two corruptions: robustbench takes the first n/2 of each
    x, y = load_cifar10c(n_examples=20, severity=3, data_dir=str(tmp_path), corruptions=["fog", "snow"])
    fog, snow = load_cifar_c(out, "fog", 3, n=10), load_cifar_c(out, "snow", 3, n=10)
    assert torch.equal((x * 255).round().to(torch.uint8), torch.cat([fog.images, snow.images]))


def test_resume_skips_finished_corruptions(tmp_path):
    data = synthetic(30)
    calls = []

    def counting(x, corruption, severity, seed=0, params=None):
        calls.append(corruption)
        return severity_shift(x, corruption, severity)

    out = write_c(data, tmp_path / "c", corruptions="fog,snow", batch_size=10, corrupt_fn=counting, progress=False)
    assert calls.count("fog") == calls.count("snow") == 15
    first = np.load(out / "snow.npy")
    calls.clear()
    write_c(data, out, corruptions="fog,snow", batch_size=10, corrupt_fn=counting, progress=False)
    assert calls == []
    (out / "fog.npy").unlink()
    (out / "snow.npy.tmp999").write_bytes(b"left over by a killed run")
    (out / "snow.npy").write_bytes((out / "labels.npy").read_bytes())  # a wrong file is rewritten
    write_c(data, out, corruptions="fog,snow,frost", batch_size=10, corrupt_fn=counting, progress=False)
    assert sorted(set(calls)) == ["fog", "frost", "snow"] and calls.count("snow") == 15
    assert np.array_equal(np.load(out / "snow.npy"), first)  # same settings, same bytes
    assert not list(out.glob("*.tmp*"))
    with pytest.raises(ValueError, match="other settings .*seed"):
        write_c(data, out, corruptions="fog", seed=5, batch_size=10, corrupt_fn=counting, progress=False)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown corruption"):
        write_c(synthetic(5), tmp_path / "c", corruptions="fog,blur", corrupt_fn=severity_shift)
    grey = ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="RGB"):
        write_c(grey, tmp_path / "c", corruptions="fog", corrupt_fn=severity_shift)


def test_cli_with_the_real_corruptions(tmp_path, capsys):
    out = tmp_path / "digits-c"
    argv = ["make-c", "--data", "digits", "--corruptions", "gaussian_noise,contrast", "--n-images", "20",
            "--seed", "3", "--out", str(out)]
    assert tta_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    noise = np.load(out / "gaussian_noise.npy")
    assert noise.shape == (100, 32, 32, 3) and noise.dtype == np.uint8
    labels = np.load(out / "labels.npy")
    assert labels.shape == (100,) and set(labels.tolist()) <= set(range(10))
    clean = load_digits("test")
    sev1, sev5 = load_cifar_c(out, "contrast", 1), load_cifar_c(out, "contrast", 5)
    assert sev5.images.float().std() < sev1.images.float().std() < clean.images.float().std()  # contrast drops
    mtime = (out / "gaussian_noise.npy").stat().st_mtime_ns
    assert tta_main(argv) == 0 and (out / "gaussian_noise.npy").stat().st_mtime_ns == mtime  # resumed: skipped
    before = np.load(out / "gaussian_noise.npy")
    assert np.array_equal(before, noise)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert tta_main(["make-c", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "tta make-c: error: dataset" in capsys.readouterr().err
    assert tta_main(["make-c", "--corruptions", "blur", "--out", str(tmp_path / "o")]) == 2
    assert "unknown corruption" in capsys.readouterr().err
    assert tta_main(["make-c", "--corruptions", "frost", "--frost-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "frost" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
