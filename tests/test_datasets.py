"""Dataset loaders on small fixture data written in tmp_path (and on the real CIFAR-10 JPEG zip when present)."""
from __future__ import annotations

import os
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import streams
from streams import folder_io
from streams.datasets import (DataFormatError, ImageDataset, LazyImageDataset, class_balanced_subset, load_cifar,
                              load_cifar_c, load_dataset, load_digits, load_domains, load_imagefolder,
                              load_imagenet_c, random_subset)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    """Every test gets its own decoded-image cache (never the user's ~/.cache)."""
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path / "cache"))


def _color(label: int, i: int) -> tuple[int, int, int]:
    return (40 * label + 3, 7 * i + 1, 200 - 11 * label)


def _write_png(path: Path, color, size=(6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_folder(root: Path, counts: dict[str, int], size=(6, 5)) -> Path:
    """``root/<class>/<i>.png`` filled with a colour that encodes (class position, i)."""
    for label, (name, count) in enumerate(sorted(counts.items())):
        for i in range(count):
            _write_png(root / name / f"{i:03d}.png", _color(label, i), size)
    return root


def zip_folder(folder: Path, target: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, prefix + path.relative_to(folder).as_posix())
    return target


# --------------------------------------------------------------------------------------------- ImageFolder
def test_imagefolder_folder_and_zip_agree(tmp_path):
    folder = make_folder(tmp_path / "tree", {"dog": 2, "cat": 3, "bird": 1})
    archive = zip_folder(folder, tmp_path / "tree.zip")
    from_folder, from_zip = load_imagefolder(folder), load_imagefolder(archive)
    for data in (from_folder, from_zip):
        assert data.classes == ["bird", "cat", "dog"]
        assert data.labels.tolist() == [0, 1, 1, 1, 2, 2]
        assert data.images.shape == (6, 3, 5, 6) and data.images.dtype == torch.uint8
        # pixel values are exact (PNG): image 2 is cat #1
        assert data.images[2, :, 0, 0].tolist() == list(_color(1, 1))
    assert torch.equal(from_folder.images, from_zip.images)
    assert from_zip.name == "tree"


def test_imagefolder_splits_and_wrapper(tmp_path):
    make_folder(tmp_path / "src" / "data" / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "src" / "data" / "test", {"a": 1, "b": 3})
    archive = zip_folder(tmp_path / "src", tmp_path / "wrapped.zip")  # members data/<split>/<class>/...
    test = load_imagefolder(archive, split="test")
    assert test.labels.tolist() == [0, 1, 1, 1] and test.name == "wrapped/test"
    assert len(load_imagefolder(tmp_path / "src" / "data", split="train")) == 4
    with pytest.raises(ValueError, match="splits test, train: pass split"):
        load_imagefolder(archive)
    with pytest.raises(ValueError, match="split 'val' not found; available splits: test, train"):
        load_imagefolder(archive, split="val")
    with pytest.raises(ValueError, match="plain <class>/<image> layout"):
        load_imagefolder(tmp_path / "src" / "data" / "test", split="test")


def test_imagefolder_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    archive = zip_folder(make_folder(tmp_path / "tree", {"a": 2, "b": 1}), tmp_path / "t.zip")
    first = load_imagefolder(archive)
    assert list((tmp_path / "cache" / "imagefolder").glob("t.zip-all-*.npz"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(folder_io, "decode_files", no_decoding)
    second = load_imagefolder(archive)
    assert torch.equal(first.images, second.images) and first.classes == second.classes
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_imagefolder(archive)
    monkeypatch.undo()
    assert torch.equal(load_imagefolder(archive, cache=False).images, first.images)


def test_imagefolder_damaged_inputs_name_the_file(tmp_path):
    archive = zip_folder(make_folder(tmp_path / "tree", {"a": 3}), tmp_path / "t.zip")
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataFormatError, match="truncated.zip.*truncated or corrupted"):
        load_imagefolder(truncated)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as handle:
        handle.writestr("a/good.png", (tmp_path / "tree" / "a" / "000.png").read_bytes())
        handle.writestr("a/broken.png", b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataFormatError, match=r"bad.zip:a/broken.png"):
        load_imagefolder(bad)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no images found"):
        load_imagefolder(empty)


def test_imagefolder_sizes_must_agree_or_be_resized(tmp_path):
    _write_png(tmp_path / "t" / "a" / "0.png", (10, 20, 30), (6, 6))
    _write_png(tmp_path / "t" / "b" / "0.png", (40, 50, 60), (9, 12))
    with pytest.raises(DataFormatError, match="pass size="):
        load_imagefolder(tmp_path / "t")
    resized = load_imagefolder(tmp_path / "t", size=4)
    assert resized.images.shape == (2, 3, 4, 4)
    assert resized.images[1, :, 2, 2].tolist() == [40, 50, 60]


def test_lazy_imagefolder_matches_eager(tmp_path):
    archive = zip_folder(make_folder(tmp_path / "tree", {"a": 3, "b": 4}), tmp_path / "t.zip")
    eager = load_imagefolder(archive)
    lazy = load_imagefolder(archive, lazy=True, cache_items=2)
    assert isinstance(lazy, LazyImageDataset) and len(lazy) == 7 and lazy.image_shape == (3, 5, 6)
    index = torch.tensor([6, 0, 3, 0])
    images, labels = lazy.get_batch(index)
    assert torch.equal(images, eager.images[index]) and torch.equal(labels, eager.labels[index])
    assert len(lazy._cache) == 2  # LRU bounded
    sub = lazy.subset([1, 5])
    assert torch.equal(sub.get_batch([0, 1])[0], eager.images[[1, 5]])
    assert torch.equal(lazy.materialize(progress=False).images, eager.images)
    assert pickle.loads(pickle.dumps(lazy)).get_batch([2])[1].tolist() == [0]


# ---------------------------------------------------------------------------------------------- ImageDataset
def test_image_dataset_interface_and_validation():
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)
    data = ImageDataset(images, torch.tensor([0, 1, 1, 0]), ["x", "y"], "toy")
    x, y = data.get_batch(np.array([3, 1]))
    assert torch.equal(x, images[[3, 1]]) and y.tolist() == [0, 1]
    sub = data.subset([2])
    assert len(sub) == 1 and sub.classes == ["x", "y"] and sub.image_shape == (3, 2, 2)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images.float(), torch.zeros(4, dtype=torch.int64), ["x"])
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        ImageDataset(images, torch.tensor([0, 1, 2, 0]), ["x", "y"])
    with pytest.raises(IndexError):
        data.get_batch([4])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 60), seed=st.integers(0, 2**31))
def test_subsets_are_seeded_and_balanced(n, seed):
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 3 + [3] * 7)
    data = ImageDataset(torch.zeros(60, 1, 1, 1, dtype=torch.uint8), labels, list("abcd"))
    for make in (random_subset, class_balanced_subset):
        picked = make(data, n, seed)
        again = make(data, n, seed)
        assert len(picked) == n and torch.equal(picked.labels, again.labels)
    counts = torch.bincount(class_balanced_subset(data, n, seed).labels, minlength=4)
    quota = np.array([30, 20, 3, 7])
    expected_min = np.minimum(quota, n // 4)
    assert (counts.numpy() >= expected_min).all()
    filled = counts.numpy() < quota  # classes that still had images left differ by at most one
    if filled.sum() > 1:
        assert counts.numpy()[filled].max() - counts.numpy()[filled].min() <= 1
    with pytest.raises(ValueError, match="n must lie in 0..60"):
        random_subset(data, 61, seed)


# ------------------------------------------------------------------------------------------------------ CIFAR
def _fake_cifar(root: Path, name: str = "cifar10", per_file: int = 4) -> Path:
    """A tiny cifar-10-batches-py / cifar-100-python folder in the official pickle format."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"
        meta = ("batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_file})
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], "fine_labels"
        meta = ("meta", {"fine_label_names": [f"c{i:03d}" for i in range(100)], "coarse_label_names": ["x"]})
    folder.mkdir(parents=True)
    for number, filename in enumerate(files):
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        data[:, 0] = number  # first red pixel says which file an image came from
        labels = [int(v) for v in rng.integers(0, 10, size=per_file)]
        batch = {"data": data, key: labels, "filenames": [f"f{i}.png" for i in range(per_file)], "batch_label": "b"}
        (folder / filename).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1], protocol=2))
    return folder


def test_cifar10_python_layout(tmp_path):
    folder = _fake_cifar(tmp_path)
    test, train = load_cifar(tmp_path, split="test"), load_cifar(folder, split="train")
    assert test.images.shape == (4, 3, 32, 32) and len(train) == 20
    assert test.images[:, 0, 0, 0].tolist() == [5] * 4 and train.images[:, 0, 0, 0].tolist() == sum(
        ([i] * 4 for i in range(5)), [])
    raw = pickle.loads((folder / "test_batch").read_bytes())
    assert test.labels.tolist() == raw["labels"] and test.classes == CIFAR10_NAMES
    assert torch.equal(test.images[1].reshape(-1), torch.from_numpy(raw["data"][1]))
    assert test.name == "cifar10/test"


def test_cifar100_python_layout_and_bytes_keys(tmp_path):
    from streams.cifar_io import CIFAR100_CLASSES

    assert len(set(CIFAR100_CLASSES)) == 100 and list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)  # official order
    folder = _fake_cifar(tmp_path, "cifar100")
    data = load_cifar(tmp_path, name="cifar100", split="train")
    assert len(data) == 4 and data.classes[:2] == ["c000", "c001"] and len(data.classes) == 100
    # Python-2 pickles can carry bytes keys: they are decoded
    raw = pickle.loads((folder / "test").read_bytes())
    (folder / "test").write_bytes(pickle.dumps({k.encode(): v for k, v in raw.items()}, protocol=2))
    assert load_cifar(tmp_path, name="cifar100").labels.tolist() == raw["fine_labels"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickles_are_read_safely(tmp_path):
    folder = _fake_cifar(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": _Evil(), "labels": [0]}, protocol=2))
    with pytest.raises(DataFormatError, match="refusing to unpickle"):
        load_cifar(tmp_path)


def test_cifar_missing_suggests_download_and_download_calls_torchvision(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*download=True"):
        load_cifar(tmp_path / "nothing")
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            _fake_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    data = load_cifar(tmp_path / "dl", split="train", download=True)
    assert calls == [(str(tmp_path / "dl"), True, True)] and len(data) == 20
    load_cifar(tmp_path / "dl", split="test", download=True)
    assert len(calls) == 1  # present now: no second download
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        load_cifar(tmp_path, name="cifar11")


# ----------------------------------------------------------------------------------------------------- digits
def test_digits_shapes_and_stratified_split():
    test, train, every = load_digits("test"), load_digits("train"), load_digits("all", size=8)
    assert every.images.shape == (1797, 3, 8, 8) and test.images.shape[1:] == (3, 32, 32)
    assert len(test) + len(train) == 1797 and abs(len(test) - 0.2 * 1797) < 1
    assert torch.equal(every.images[:, 0], every.images[:, 2])  # grey replicated
    assert int(every.images.max()) == 255 and int(every.images.min()) == 0
    total = torch.bincount(every.labels, minlength=10).double()
    ratio = torch.bincount(test.labels, minlength=10) / total
    assert ((ratio - 0.2).abs() < 0.02).all()  # stratified
    # a partition of the same images: byte strings of train + test = all images
    full = load_digits("all")
    as_set = lambda d: sorted(bytes(img.numpy()) + bytes([int(y)]) for img, y in zip(d.images, d.labels))
    assert sorted(as_set(test) + as_set(train)) == as_set(full)
    assert torch.equal(load_digits("test", seed=0).images, test.images)
    assert not torch.equal(load_digits("test", seed=1).labels, test.labels)
    with pytest.raises(ValueError, match="split must be"):
        load_digits("dev")


# ------------------------------------------------------------------------------------------------- CIFAR-10-C
def _fake_cifar_c(folder: Path, corruption="fog", n=6, labels_repeated=True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.zeros((5 * n, 4, 4, 3), dtype=np.uint8)
    for severity in range(5):
        images[severity * n:(severity + 1) * n] = np.arange(n, dtype=np.uint8)[:, None, None, None] + 10 * severity
    np.save(folder / f"{corruption}.npy", images)
    labels = np.arange(n, dtype=np.uint8) % 3
    np.save(folder / "labels.npy", np.tile(labels, 5) if labels_repeated else labels)


def test_cifar_c_layouts(tmp_path):
    _fake_cifar_c(tmp_path / "plain")
    data = load_cifar_c(tmp_path / "plain", "fog", 3)
    assert data.images.shape == (6, 3, 4, 4) and data.images[:, 1, 2, 2].tolist() == [20, 21, 22, 23, 24, 25]
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.classes == CIFAR10_NAMES and data.name == "fog-3"
    _fake_cifar_c(tmp_path / "rb" / "CIFAR-10-C", labels_repeated=False)
    first = load_cifar_c(tmp_path / "rb", "fog", 5, n=2)
    assert first.images[:, 0, 0, 0].tolist() == [40, 41] and first.labels.tolist() == [0, 1]
    _fake_cifar_c(tmp_path / "c100" / "CIFAR-100-C", n=40)
    np.save(tmp_path / "c100" / "CIFAR-100-C" / "labels.npy", np.tile(np.arange(40, dtype=np.uint8) + 60, 5))
    hundred = load_cifar_c(tmp_path / "c100", "fog", 2)  # found without name="cifar100"; its class names
    assert len(hundred.classes) == 100 and hundred.classes[60] == "plain" and hundred.labels[0] == 60
    (tmp_path / "plain" / "classes.txt").write_text("u\nv\nw\n")
    assert load_cifar_c(tmp_path / "plain", "fog", 1).classes == ["u", "v", "w"]


def test_cifar_c_bad_files(tmp_path):
    _fake_cifar_c(tmp_path)
    with pytest.raises(FileNotFoundError, match="snow.npy.*CIFAR-10-C layout"):
        load_cifar_c(tmp_path, "snow", 1)
    with pytest.raises(ValueError, match="severity must lie in 1..5"):
        load_cifar_c(tmp_path, "fog", 6)
    path = tmp_path / "fog.npy"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataFormatError, match="fog.npy.*truncated"):
        load_cifar_c(tmp_path, "fog", 1)
    np.save(path, np.zeros((7, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(DataFormatError, match=r"fog.npy: shape \(7, 4, 4, 3\)"):
        load_cifar_c(tmp_path, "fog", 1)
    np.save(path, np.zeros((10, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(DataFormatError, match="labels.npy: shape"):
        load_cifar_c(tmp_path, "fog", 1)


# --------------------------------------------------------------------------------------- ImageNet-C, domains
def test_imagenet_c_is_lazy(tmp_path):
    for wnid, count in (("n02", 2), ("n01", 1)):
        for i in range(count):
            _write_png(tmp_path / "ImageNet-C" / "fog" / "3" / wnid / f"{i}.JPEG", (200 * (wnid == "n02"),) * 3, (8, 8))
    data = load_imagenet_c(tmp_path, "fog", 3)
    assert isinstance(data, LazyImageDataset) and data.classes == ["n01", "n02"] and data.name == "fog-3"
    images, labels = data.get_batch([2, 0])
    assert labels.tolist() == [1, 0] and images.shape == (2, 3, 8, 8)
    assert abs(int(images[0].float().mean()) - 200) <= 3 and int(images[1].max()) <= 3  # JPEG is lossy
    with pytest.raises(FileNotFoundError, match="fog/2"):
        load_imagenet_c(tmp_path, "fog", 2)


def test_domains(tmp_path):
    root = tmp_path / "pacs"
    make_folder(root / "art", {"dog": 2, "cat": 1})
    make_folder(root / "photo", {"dog": 1, "cat": 2})
    loaded = load_domains(root)
    assert list(loaded) == ["art", "photo"]
    assert loaded["photo"].labels.tolist() == [0, 0, 1] and loaded["art"].classes == ["cat", "dog"]
    assert list(load_domains(root, ["photo"])) == ["photo"]
    with pytest.raises(FileNotFoundError, match=r"\['sketch'\] not found; available: art, photo"):
        load_domains(root, ["sketch"])
    make_folder(root / "sketch", {"dog": 1, "horse": 1})
    with pytest.raises(DataFormatError, match=r"'sketch' differ .*missing: \['cat'\], extra: \['horse'\]"):
        load_domains(root)


# --------------------------------------------------------------------------------------------- load_dataset
def test_load_dataset_dispatch(tmp_path):
    assert load_dataset("digits").name == "digits/test"
    make_folder(tmp_path / "split" / "test", {"a": 1, "b": 1})
    make_folder(tmp_path / "split" / "train", {"a": 2, "b": 1})
    assert len(load_dataset(tmp_path / "split")) == 2 and len(load_dataset(tmp_path / "split", split="train")) == 3
    plain = make_folder(tmp_path / "plain", {"a": 2})
    assert len(load_dataset(plain)) == 2  # no split folders: split is not needed
    assert len(load_dataset(zip_folder(plain, tmp_path / "plain.zip"))) == 2
    _fake_cifar(tmp_path / "cifar")
    assert load_dataset(tmp_path / "cifar", split="train").name == "cifar10/train"
    with pytest.raises(FileNotFoundError, match="'digits', an ImageFolder"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataFormatError, match="no images found.*nor is it a CIFAR python folder"):
        load_dataset(tmp_path / "nothing")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot load"):
        load_dataset(tmp_path / "x.txt")


def test_lazy_exports():
    assert streams.load_digits is load_digits and streams.ImageDataset is ImageDataset


# --------------------------------------------------------------------------------------------------- real data
def test_real_cifar10_jpeg_zip(cifar10_zip, tmp_path_factory, monkeypatch):
    # a cache shared by the real-data tests of this session (decoded once), never the user's ~/.cache
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "real-data-cache"))
    test = load_imagefolder(cifar10_zip, split="test")
    assert test.images.shape == (10000, 3, 32, 32) and test.classes == CIFAR10_NAMES
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert (test.labels[1:] >= test.labels[:-1]).all()  # class-sorted on disk (streams must shuffle)
    assert 100 < float(test.images.float().mean()) < 140

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(folder_io, "decode_files", no_decoding)  # the second load must come from the cache
    again = load_imagefolder(cifar10_zip, split="test")
    assert torch.equal(again.images, test.images)
