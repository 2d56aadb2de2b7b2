"""Protocols as plain data (kinds, domain sequences, validation) and the seeded orders they ask for."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import streams
from streams.orders import derive_seed, dirichlet_order, generator
from streams.protocols import GRADUAL_SEVERITIES, Domain, Protocol, corruption_names, make_protocol


def test_corruption_name_sets():
    assert corruption_names("all") == tuple(streams.CORRUPTIONS) and len(streams.CORRUPTIONS) == 15
    assert corruption_names("extra") == tuple(streams.EXTRA_CORRUPTIONS) and len(streams.EXTRA_CORRUPTIONS) == 4
    assert corruption_names("fog, snow") == ("fog", "snow")
    assert streams.CORRUPTIONS[0] == "gaussian_noise" and streams.CORRUPTIONS[-1] == "jpeg_compression"


@pytest.mark.parametrize("kind", ["reset", "continual", "mixed", "correlated", "correlated-continual"])
def test_one_domain_per_corruption(kind):
    protocol = make_protocol(kind, severity=3, batch_size=64, seed=7, n_images=500)
    assert protocol.kind == kind and protocol.batch_size == 64 and protocol.seed == 7 and protocol.n_images == 500
    assert [d.corruption for d in protocol.domains] == list(streams.CORRUPTIONS)
    assert {d.severity for d in protocol.domains} == {3}
    assert protocol.domains[0] == Domain("gaussian_noise-3", "gaussian_noise", 3)
    assert protocol.dirichlet_delta == (0.1 if kind.startswith("correlated") else None)


def test_gradual_severity_sequence():
    protocol = make_protocol("gradual", corruptions=["fog", "snow"])
    assert GRADUAL_SEVERITIES == (1, 2, 3, 4, 5, 4, 3, 2, 1)
    assert [(d.corruption, d.severity) for d in protocol.domains] == (
        [("fog", s) for s in GRADUAL_SEVERITIES] + [("snow", s) for s in GRADUAL_SEVERITIES])
    custom = make_protocol("gradual", corruptions="fog", severity=[5, 3, 1])
    assert [d.severity for d in custom.domains] == [5, 3, 1]


def test_severity_sequences_and_real_domains():
    protocol = make_protocol("continual", corruptions="fog,snow", severity=(5, 1))
    assert [d.name for d in protocol.domains] == ["fog-5", "fog-1", "snow-5", "snow-1"]
    real = make_protocol("reset", domains=["art", "photo", Domain("sketch")])
    assert real.domains == (Domain("art"), Domain("photo"), Domain("sketch"))
    assert all(d.corruption is None and d.severity is None for d in real.domains)


def test_protocol_is_frozen_plain_data():
    protocol = make_protocol("continual", corruptions="fog")
    with pytest.raises(dataclasses.FrozenInstanceError):
        protocol.seed = 3  # type: ignore[misc]
    assert protocol == make_protocol("continual", corruptions="fog") and hash(protocol) == hash(
        make_protocol("continual", corruptions="fog"))
    assert dataclasses.replace(protocol, batch_size=1).batch_size == 1


@pytest.mark.parametrize("kind", ["continual", "gradual", "correlated-continual"])
def test_rounds_repeat_the_domain_sequence_of_a_continual_kind(kind):
    one = make_protocol(kind, corruptions="fog,snow", severity=5)
    three = make_protocol(kind, corruptions="fog,snow", severity=5, rounds=3)
    assert one.rounds == 1 and one.sequence == one.domains
    assert three.rounds == 3 and three.domains == one.domains  # one round's domains, repeated by ``sequence``
    assert three.sequence == one.domains * 3 and len(three.sequence) == 3 * len(one.domains)
    assert three != one and dataclasses.replace(three, rounds=1) == one


@pytest.mark.parametrize("kind", ["reset", "correlated", "mixed"])
def test_rounds_are_refused_where_every_domain_starts_from_a_reset(kind):
    assert make_protocol(kind, corruptions="fog", rounds=1).rounds == 1
    with pytest.raises(ValueError, match=f"rounds=2: a '{kind}' protocol resets before every domain.*continual kind"):
        make_protocol(kind, corruptions="fog", rounds=2)


@pytest.mark.parametrize("call, message", [
    (lambda: make_protocol("sorted"), "unknown protocol kind 'sorted'"),
    (lambda: make_protocol("reset", corruptions="fog,blur"), r"unknown corruption\(s\) \['blur'\]"),
    (lambda: make_protocol("reset", corruptions=[]), "unknown corruption"),
    (lambda: make_protocol("reset", severity=0), "severity must be an int in 1..5"),
    (lambda: make_protocol("reset", severity=6), "severity must be an int in 1..5"),
    (lambda: make_protocol("reset", severity=True), "severity must be an int in 1..5"),
    (lambda: make_protocol("gradual", severity=[1, 7]), "severity must be an int in 1..5"),
    (lambda: make_protocol("reset", batch_size=0), "batch_size must be an int >= 1"),
    (lambda: make_protocol("reset", batch_size=2.5), "batch_size must be an int >= 1"),
    (lambda: make_protocol("correlated", delta=0), "delta .* must be > 0"),
    (lambda: make_protocol("correlated", delta=-1.0), "delta .* must be > 0"),
    (lambda: make_protocol("reset", n_images=0), "n_images must be None or an int >= 1"),
    (lambda: make_protocol("gradual", domains=["art"]), "'gradual' protocol needs corrupted domains"),
    (lambda: Protocol("correlated", (Domain("a"),)), "needs dirichlet_delta"),
    (lambda: Protocol("reset", ()), "non-empty tuple of Domain"),
    (lambda: Protocol("reset", (Domain("a"),), dirichlet_delta=float("nan")), "dirichlet_delta must be > 0"),
    (lambda: make_protocol("continual", rounds=0), "rounds must be an int >= 1"),
    (lambda: make_protocol("continual", rounds=2.0), "rounds must be an int >= 1"),
    (lambda: Domain("fog-9", "fog", 9), "severity must be an int in 1..5"),
    (lambda: Domain("art", None, 3), "a severity needs a corruption"),
    (lambda: Domain(""), "non-empty name"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------------ orders
def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "order", "fog-5|fog|5|0") == derive_seed(0, "order", "fog-5|fog|5|0")
    seeds = {derive_seed(s, "corrupt", k, b) for s in range(3) for k in ("a", "b") for b in range(20)}
    assert len(seeds) == 120
    assert derive_seed(-1, "x") == derive_seed(2**64 - 1, "x")  # negative seeds are accepted
    assert 0 <= derive_seed(5) < 2**32


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=12), delta=st.floats(1e-3, 100.0),
       seed=st.integers(0, 2**32))
def test_dirichlet_order_is_a_seeded_permutation(counts, delta, seed):
    labels = np.repeat(np.arange(len(counts)), counts)
    order = dirichlet_order(labels, delta, generator(seed))
    assert sorted(order.tolist()) == list(range(len(labels)))  # every sample exactly once
    assert np.array_equal(order, dirichlet_order(labels, delta, generator(seed)))


def _mean_top_class_share(labels: np.ndarray, order: np.ndarray, batch: int) -> float:
    ordered = labels[order]
    shares = [np.bincount(ordered[i:i + batch]).max() / len(ordered[i:i + batch])
              for i in range(0, len(ordered), batch)]
    return float(np.mean(shares))


def test_smaller_delta_concentrates_labels_per_batch():
    labels = np.repeat(np.arange(10), 200)  # class-sorted, like the CIFAR-10 JPEG zip
    shares = {}
    for delta in (100.0, 1.0, 0.1, 0.01):
        shares[delta] = np.mean([_mean_top_class_share(labels, dirichlet_order(labels, delta, generator(s)), 64)
                                 for s in range(5)])
    iid = np.mean([_mean_top_class_share(labels, generator(s).permutation(len(labels)), 64) for s in range(5)])
    # chunks stay contiguous inside a slot (as in the reference code): even large delta is more concentrated
    assert iid < 0.2 < shares[100.0]
    assert shares[100.0] < shares[1.0] < shares[0.1] < shares[0.01]
    assert shares[0.01] > 0.85  # near label-sorted batches


def test_dirichlet_order_rejects_bad_delta():
    with pytest.raises(ValueError, match="delta must be > 0"):
        dirichlet_order(np.zeros(3, dtype=int), 0.0, generator(0))
    assert dirichlet_order(np.zeros(0, dtype=int), 0.1, generator(0)).size == 0
