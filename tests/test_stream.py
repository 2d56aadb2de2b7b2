"""Streams: segments and reset flags per protocol kind, coverage, determinism, resume, mixing, correlation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import streams
from streams import Domain, ImageDataset, Protocol, make_protocol, make_stream


def class_sorted(n_per_class: int = 20, classes: int = 5, size: int = 4) -> ImageDataset:
    """Images whose pixel (0, 0, 0) holds their own index (mod 256) and whose labels are sorted, like on disk."""
    n = n_per_class * classes
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256
    images[:, 1] = 100
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return ImageDataset(images, labels, [f"c{i}" for i in range(classes)], "toy")


def severity_marker(x, corruption, severity, seed=0, params=None):
    """A fake corruption: channel 2 carries the severity and a value drawn from the seed, nothing else changes."""
    out = x.clone()
    g = torch.Generator().manual_seed(seed)
    out[:, 2] = severity / 10 + torch.rand(1, generator=g).item() / 100
    return out


def _index_of(batch) -> list[int]:
    return (batch.x[:, 0, 0, 0] * 255).round().long().tolist()


@pytest.mark.parametrize("kind, resets", [
    ("reset", [True, True, True]), ("continual", [True, False, False]), ("correlated", [True, True, True]),
    ("correlated-continual", [True, False, False])])
def test_segments_and_reset_flags(kind, resets):
    protocol = make_protocol(kind, corruptions="fog,snow,frost", batch_size=32)
    stream = make_stream(class_sorted(), protocol, severity_marker)
    assert [s.reset_before for s in stream.segments] == resets
    assert [s.name for s in stream.segments] == ["fog-5", "snow-5", "frost-5"]
    assert [s.domains for s in stream.segments] == [(d,) for d in protocol.domains]
    assert stream.num_batches(0) == 4 and stream.num_batches() == 12 == len(list(stream))


def test_gradual_and_mixed_segments():
    gradual = make_stream(class_sorted(), make_protocol("gradual", corruptions="fog,snow"), severity_marker)
    assert len(gradual.segments) == 18 and [s.reset_before for s in gradual.segments] == [True] + [False] * 17
    assert [s.name for s in gradual.segments[:10]] == [
        "fog-1", "fog-2", "fog-3", "fog-4", "fog-5", "fog-4#2", "fog-3#2", "fog-2#2", "fog-1#2", "snow-1"]
    severities = [s.domains[0].severity for s in gradual.segments]
    assert severities == [1, 2, 3, 4, 5, 4, 3, 2, 1] * 2
    for segment, severity in zip(range(18), severities):  # each segment is corrupted at its own severity
        batch = next(gradual.batches(segment))
        assert torch.allclose(batch.x[:, 2].amax(), torch.tensor(severity / 10), atol=0.011)
    mixed = make_stream(class_sorted(), make_protocol("mixed", corruptions="fog,snow,frost", batch_size=30),
                        severity_marker)
    assert len(mixed.segments) == 1 and mixed.segments[0].name == "mixed" and mixed.segments[0].reset_before
    assert mixed.num_batches() == 10


def test_mixed_batches_mix_domains_and_corrupt_each_with_its_own_severity():
    protocol = make_protocol("mixed", corruptions="fog", severity=(1, 3, 5), batch_size=30)
    stream = make_stream(class_sorted(), protocol, severity_marker)
    counts = torch.zeros(3, dtype=torch.int64)
    for batch in stream:
        present = batch.domain_index.unique()
        assert len(present) >= 2  # every batch mixes domains
        counts += torch.bincount(batch.domain_index, minlength=3)
        for d in present.tolist():
            rows = batch.domain_index == d
            expected = protocol.domains[d].severity / 10
            assert (batch.x[rows, 2] - expected).abs().max() <= 0.011
    assert counts.tolist() == [100, 100, 100]


@settings(max_examples=25, deadline=None)
@given(batch_size=st.integers(1, 70), seed=st.integers(0, 2**40), kind=st.sampled_from(
    ["reset", "continual", "mixed", "correlated"]), delta=st.floats(0.01, 10.0))
def test_every_sample_once_per_domain(batch_size, seed, kind, delta):
    data = class_sorted(n_per_class=12, classes=4)
    protocol = make_protocol(kind, corruptions="fog,snow", batch_size=batch_size, seed=seed, delta=delta)
    stream = make_stream(data, protocol, severity_marker)
    seen = {0: [], 1: []}
    labels = {0: [], 1: []}
    for batch in stream:
        assert 1 <= len(batch.y) <= batch_size and batch.x.dtype == torch.float32
        assert batch.x.shape[1:] == (3, 4, 4) and 0 <= float(batch.x.min()) and float(batch.x.max()) <= 1
        for d in (0, 1):
            rows = batch.domain_index == d
            seen[d] += [i for i, keep in zip(_index_of(batch), rows.tolist()) if keep]
            labels[d] += batch.y[rows].tolist()
    for d in (0, 1):
        assert sorted(seen[d]) == list(range(48))
        assert [int(data.labels[i]) for i in seen[d]] == labels[d]  # labels travel with their images
    assert stream.num_batches() == sum(1 for _ in stream)


def test_class_sorted_data_is_shuffled_unless_correlated():
    data = class_sorted(n_per_class=40, classes=5)
    iid = make_stream(data, make_protocol("reset", corruptions="fog", batch_size=40), severity_marker)
    first = next(iid.batches(0))
    assert len(first.y.unique()) >= 4
    correlated = make_stream(data, make_protocol("correlated", corruptions="fog", batch_size=40, delta=0.01),
                             severity_marker)

    def top_share(stream):
        return np.mean([torch.bincount(b.y).max().item() / len(b.y) for b in stream])

    assert top_share(correlated) > top_share(iid) + 0.3
    chained = make_stream(data, make_protocol("correlated-continual", corruptions="fog", batch_size=40, delta=0.01),
                          severity_marker)
    assert [torch.equal(a.y, b.y) for a, b in zip(chained, correlated)] == [True] * 5  # the same label order


def test_same_protocol_same_batches_bitwise_and_segment_resume():
    data = class_sorted()
    protocol = make_protocol("continual", corruptions="fog,snow,frost", batch_size=24, seed=3, n_images=70)
    full = list(make_stream(data, protocol, severity_marker))
    again = list(make_stream(data, protocol, severity_marker))
    assert len(full) == len(again) == 9
    for a, b in zip(full, again):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.domain_index, b.domain_index)
    resumed = make_stream(data, protocol, severity_marker)
    alone = list(resumed.batches(2))
    inside = [b for b in full if b.segment == 2]
    assert [b.index for b in alone] == [0, 1, 2] and len(alone) == len(inside)
    for a, b in zip(alone, inside):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = list(make_stream(data, make_protocol("continual", corruptions="fog,snow,frost", batch_size=24, seed=4,
                                                  n_images=70), severity_marker))
    assert not torch.equal(other[0].x, full[0].x)
    # a domain gets the same images and order whatever protocol kind it runs under
    reset = make_stream(data, make_protocol("reset", corruptions="snow", batch_size=24, seed=3, n_images=70),
                        severity_marker)
    assert torch.equal(next(reset.batches(0)).x, full[3].x)


@pytest.mark.parametrize("kind", ["continual", "gradual", "correlated-continual"])
def test_rounds_are_fresh_passes_over_the_same_images_in_one_chain(kind):
    data = class_sorted()
    one = make_stream(data, make_protocol(kind, corruptions="fog,snow", batch_size=24, seed=3, n_images=70),
                      severity_marker)
    three = make_stream(data, make_protocol(kind, corruptions="fog,snow", batch_size=24, seed=3, n_images=70,
                                            rounds=3), severity_marker)
    per_round = len(one.segments)
    assert len(three.segments) == 3 * per_round and three.num_batches() == 3 * one.num_batches()
    assert [s.round for s in three.segments] == [r for r in range(3) for _ in range(per_round)]
    assert [s.reset_before for s in three.segments] == [True] + [False] * (3 * per_round - 1)  # one chain
    assert [s.name for s in three.segments[per_round:2 * per_round]] == [f"{s.name}/r1" for s in one.segments]
    assert len({s.name for s in three.segments}) == 3 * per_round
    # round 0 is bitwise the one-round stream
    for a, b in zip(one, three):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    for s in range(per_round):
        first, second, third = (three.order(s + r * per_round)[1] for r in range(3))
        # the same images every round, in a new seeded order, with new corruption noise
        assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(third.tolist())
        assert not np.array_equal(first, second) and not np.array_equal(second, third)
        noise = {three.corruption_seed(s + r * per_round, 0) for r in range(3)}
        assert len(noise) == 3
    # rebuilt from the protocol, the last round gives the same batches bitwise (a resume can start there)
    again = make_stream(data, three.protocol, severity_marker)
    last = len(three.segments) - 1
    assert all(torch.equal(a.x, b.x) for a, b in zip(again.batches(last), three.batches(last)))


def test_n_images_is_one_subset_shared_by_all_corruptions():
    data = class_sorted()
    stream = make_stream(data, make_protocol("reset", corruptions="fog,snow", n_images=30, batch_size=7),
                         severity_marker)
    picked = [sorted(stream.order(s)[1].tolist()) for s in range(2)]
    assert picked[0] == picked[1] and len(picked[0]) == 30 == len(set(picked[0]))
    assert stream.num_samples() == 60 and stream.num_batches(0) == 5
    # pre-corrupted copies of one dataset (CIFAR-10-C files) get the same positions too
    copies = make_stream({"fog-5": data, "snow-5": class_sorted()},
                         make_protocol("reset", domains=["fog-5", "snow-5"], n_images=30))
    assert [sorted(copies.order(s)[1].tolist()) for s in range(2)] == picked
    big = make_stream(data, make_protocol("reset", corruptions="fog", n_images=10**6), severity_marker)
    assert big.num_samples() == 100  # at most the data there is


def test_corruption_seed_depends_on_domain_and_batch():
    stream = make_stream(class_sorted(), make_protocol("gradual", corruptions="fog", batch_size=10), severity_marker)
    seeds = {stream.corruption_seed(d, b) for d in range(9) for b in range(10)}
    assert len(seeds) == 90  # severity 1 occurs twice in the gradual sequence, with different seeds
    calls = []

    def recording(x, corruption, severity, seed=0, params=None):
        calls.append((corruption, severity, seed, x.shape[0]))
        return x

    list(make_stream(class_sorted(), make_protocol("reset", corruptions="fog", severity=2, batch_size=64),
                     recording))
    assert [(c, s, n) for c, s, _, n in calls] == [("fog", 2, 64), ("fog", 2, 36)]
    assert calls[0][2] != calls[1][2]


def test_real_domains_and_precorrupted_sets_from_a_dict():
    art, photo = class_sorted(10, 2), class_sorted(5, 2)
    protocol = make_protocol("continual", domains=["art", "photo"], batch_size=8)
    stream = make_stream({"art": art, "photo": photo}, protocol)  # no corruption function needed
    batches = list(stream)
    assert [b.segment for b in batches] == [0, 0, 0, 1, 1] and stream.num_samples(1) == 10
    assert torch.equal(batches[3].x[:, 1], torch.full((8, 4, 4), 100 / 255))
    mixed = make_stream({"clean": art, "art": art}, Protocol("mixed", (Domain("art"), Domain.corrupted("fog", 2)),
                                                             batch_size=40), severity_marker)
    batch = next(iter(mixed))
    assert sorted(torch.bincount(batch.domain_index).tolist()) == [20, 20]
    with pytest.raises(KeyError, match="no dataset for domain 'photo'"):
        make_stream({"art": art}, protocol)
    with pytest.raises(KeyError, match="under 'clean'"):
        make_stream({"art": art}, make_protocol("reset", corruptions="fog"))
    with pytest.raises(ValueError, match="pass a dict of datasets"):
        make_stream(art, protocol)
    with pytest.raises(ValueError, match="different shapes"):
        make_stream({"art": art, "photo": class_sorted(size=5)}, make_protocol("mixed", domains=["art", "photo"]))
    with pytest.raises(IndexError, match="2 segments"):
        next(stream.batches(2))


def test_batch_size_one():
    stream = make_stream(class_sorted(2, 3), make_protocol("mixed", corruptions="fog,snow", batch_size=1),
                         severity_marker)
    batches = list(stream)
    assert len(batches) == 12 and all(b.x.shape == (1, 3, 4, 4) for b in batches)
    assert [b.index for b in batches] == list(range(12))


def test_with_the_real_corruption_generator():
    data = streams.load_digits("test")
    protocol = make_protocol("continual", corruptions="gaussian_noise,contrast", batch_size=50, n_images=100)
    stream = make_stream(data, protocol)
    first, again = list(stream), list(make_stream(data, protocol))
    assert len(first) == 4
    for a, b in zip(first, again):
        assert torch.equal(a.x, b.x)
        assert a.x.dtype == torch.float32 and a.x.shape == (50, 3, 32, 32)
        assert 0 <= float(a.x.min()) and float(a.x.max()) <= 1
    clean, _ = data.get_batch(torch.from_numpy(stream.order(0)[1][:50]))
    assert not torch.allclose(first[0].x, clean.float() / 255)  # corrupted


def test_real_zip_stream_is_shuffled(cifar10_zip, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "real-data-cache"))
    data = streams.load_imagefolder(cifar10_zip, split="test")
    stream = make_stream(data, make_protocol("reset", corruptions="fog", batch_size=200), severity_marker)
    batch = next(stream.batches(0))
    assert len(batch.y.unique()) == 10 and torch.bincount(batch.y).max() < 40
