"""A stream: a protocol joined with data, yielding float batches segment by segment.

Determinism: the subset, the order of every segment and the corruption seed of every batch depend only on the
protocol's seed and on the identity of the domain (its name, corruption, severity and how many times it already
occurred in the protocol), never on the iteration history. So the same protocol gives the same batches bitwise,
a segment iterated alone gives exactly the batches it gives inside the full iteration (a runner can resume at any
segment), and a domain gives bitwise the same batches under ``reset`` and ``continual`` (and draws the same
``n_images`` subset under every kind). With ``rounds > 1`` the domain sequence is repeated; a repeated domain is a
further occurrence, so each round draws a new order and new corruption noise over the same subset, and round 0
gives bitwise the batches of the one-round stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Union

import numpy as np
import torch
from torch import Tensor

from streams.image_dataset import AnyImageDataset
from streams.orders import derive_seed, dirichlet_order, generator, shuffled_order
from streams.protocols import Domain, Protocol

CorruptFn = Callable[..., Tensor]  # corrupt(x, corruption, severity, seed=...) -> Tensor
CLEAN_KEY = "clean"  # key of the clean source in a data dict, for corrupted domains


@dataclass(frozen=True)
class Segment:
    """A run of batches between two points where a runner may reset: its domains, whether to reset first, and
    the round (0-based) of the protocol's domain sequence it belongs to."""

    name: str
    domains: tuple[Domain, ...]
    reset_before: bool
    round: int = 0


@dataclass
class Batch:
    """One batch: ``x`` float32 (B, C, H, W) in [0, 1] (corrupted), ``y`` int64 (B,), ``domain_index`` int64 (B,)
    into ``stream.domains``, the segment number and the batch number within that segment."""

    x: Tensor
    y: Tensor
    domain_index: Tensor
    segment: int
    index: int


def _build_segments(protocol: Protocol) -> list[tuple[Segment, tuple[int, ...]]]:
    """Segments with their domain positions in ``protocol.sequence``. Names are unique: a domain repeated within a
    round (the gradual sequence visits every severity but 5 twice) is named ``<name>#2`` the second time, and with
    several rounds every name ends in its round, ``<name>/r<round>`` (0-based), so records keyed by name do not
    collide and a report shows where each round starts."""
    domains = protocol.domains
    if protocol.kind == "mixed":
        return [(Segment("mixed", domains, True), tuple(range(len(domains))))]
    reset_each = protocol.kind in ("reset", "correlated")  # correlated-continual: never reset, as continual
    segments = []
    for round_index in range(protocol.rounds):
        seen: dict[str, int] = {}
        for j, domain in enumerate(domains):
            i = round_index * len(domains) + j
            seen[domain.name] = seen.get(domain.name, 0) + 1
            name = domain.name if seen[domain.name] == 1 else f"{domain.name}#{seen[domain.name]}"
            if protocol.rounds > 1:
                name = f"{name}/r{round_index}"
            segments.append((Segment(name, (domain,), reset_each or i == 0, round_index), (i,)))
    return segments


def _domain_keys(domains: tuple[Domain, ...]) -> list[str]:
    """A stable identity per domain position: the domain itself plus its occurrence count (gradual repeats,
    rounds), which seeds the position's order and corruption noise."""
    seen: dict[Domain, int] = {}
    keys = []
    for domain in domains:
        count = seen.get(domain, 0)
        seen[domain] = count + 1
        keys.append(f"{domain.name}|{domain.corruption}|{domain.severity}|{count}")
    return keys


class Stream:
    """Batches of a protocol over data; build it with :func:`make_stream`."""

    def __init__(self, data: Union[AnyImageDataset, Mapping[str, AnyImageDataset]], protocol: Protocol,
                 corrupt_fn: CorruptFn | None = None, device: torch.device | str = "cpu") -> None:
        self.protocol = protocol
        self.device = torch.device(device)  # where batches are made (and corrupted); labels stay on the CPU
        self.domains: tuple[Domain, ...] = protocol.sequence  # every round's positions (one round: the domains)
        built = _build_segments(protocol)
        self.segments: list[Segment] = [segment for segment, _ in built]
        self._members = [members for _, members in built]
        self._keys = _domain_keys(self.domains)
        self._corrupt_fn = corrupt_fn
        self._sources = [self._source(data, d) for d in self.domains]
        self._subsets = [self._subset(i) for i in range(len(self.domains))]
        for segment, members in built:
            shapes = {tuple(self._sources[i].image_shape) for i in members}
            if len(shapes) > 1:
                raise ValueError(f"segment {segment.name!r} mixes images of different shapes {sorted(shapes)}")

    # ------------------------------------------------------------------------------------------ data sources
    @staticmethod
    def _source(data, domain: Domain) -> AnyImageDataset:
        if not isinstance(data, Mapping):
            if not hasattr(data, "get_batch") or not hasattr(data, "labels"):
                raise TypeError(f"data must be an ImageDataset or a dict of them, got {type(data).__name__}")
            if domain.corruption is None:
                raise ValueError(f"domain {domain.name!r} is a real domain (no corruption): pass a dict of datasets "
                                 f"keyed by domain name")
            return data
        if domain.corruption is None:
            if domain.name not in data:
                raise KeyError(f"no dataset for domain {domain.name!r}; the data dict has {', '.join(data)}")
            return data[domain.name]
        if CLEAN_KEY not in data:
            raise KeyError(f"domain {domain.name!r} is corrupted on the fly from the clean data: add it to the data "
                           f"dict under {CLEAN_KEY!r} (or pass the clean ImageDataset itself)")
        return data[CLEAN_KEY]

    def source(self, domain: int) -> AnyImageDataset:
        """The dataset that domain position ``domain`` draws its images from (the clean data when corrupted on the
        fly); its length can exceed the domain's subset of ``n_images``."""
        return self._sources[domain]

    def _subset(self, i: int) -> np.ndarray:
        """Positions in the source used by domain i: all, or a seeded subset of at most ``n_images``."""
        source, n = self._sources[i], self.protocol.n_images
        if n is None or n >= len(source):
            return np.arange(len(source))
        # seeded by the source size only: every corruption of the same clean data, and every pre-corrupted copy of
        # it (CIFAR-10-C files share one image order), uses the same images
        return np.sort(generator(self.protocol.seed, "subset", len(source)).choice(len(source), n, replace=False))

    # ------------------------------------------------------------------------------------------------ orders
    def _order(self, segment: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain position, source index) of every sample of a segment, in stream order."""
        members = self._members[segment]
        domain_of = np.concatenate([np.full(len(self._subsets[i]), i, dtype=np.int64) for i in members])
        index = np.concatenate([self._subsets[i] for i in members]).astype(np.int64)
        key = "mixed" if self.protocol.kind == "mixed" else self._keys[members[0]]
        rng = generator(self.protocol.seed, "order", key)
        if self.protocol.dirichlet_delta is None:
            order = shuffled_order(len(index), rng)
        else:
            labels = np.concatenate([self._sources[i].labels.numpy()[self._subsets[i]] for i in members])
            order = dirichlet_order(labels, self.protocol.dirichlet_delta, rng)
        return domain_of[order], index[order]

    def order(self, segment: int) -> tuple[np.ndarray, np.ndarray]:
        """The (domain position, source index) pairs of a segment in stream order (for inspection and tests)."""
        return self._order(self._check_segment(segment))

    # ----------------------------------------------------------------------------------------------- batches
    def _check_segment(self, segment: int) -> int:
        if not -len(self.segments) <= segment < len(self.segments):
            raise IndexError(f"segment {segment} out of range: the stream has {len(self.segments)} segments")
        return segment % len(self.segments)

    def num_samples(self, segment: int | None = None) -> int:
        segments = range(len(self.segments)) if segment is None else [self._check_segment(segment)]
        return sum(len(self._subsets[i]) for s in segments for i in self._members[s])

    def num_batches(self, segment: int | None = None) -> int:
        """Batches in one segment, or in the whole stream (the last batch of a segment may be smaller)."""
        segments = range(len(self.segments)) if segment is None else [self._check_segment(segment)]
        size = self.protocol.batch_size
        return sum(-(-self.num_samples(s) // size) for s in segments)

    def _corrupt(self) -> CorruptFn:
        if self._corrupt_fn is None:
            from streams.corruptions import corrupt

            self._corrupt_fn = corrupt
        return self._corrupt_fn

    def corruption_seed(self, domain: int, batch: int) -> int:
        """The seed given to ``corrupt`` for the samples of domain position ``domain`` in batch ``batch``."""
        return derive_seed(self.protocol.seed, "corrupt", self._keys[domain], batch)

    def batches(self, segment: int) -> Iterator[Batch]:
        """The batches of one segment, in order."""
        segment = self._check_segment(segment)
        domain_of, index = self._order(segment)
        size = self.protocol.batch_size
        for number, start in enumerate(range(0, len(index), size)):
            yield self._make_batch(domain_of[start:start + size], index[start:start + size], segment, number)

    def _make_batch(self, domain_of: np.ndarray, index: np.ndarray, segment: int, number: int) -> Batch:
        present = list(dict.fromkeys(domain_of.tolist()))  # the domains in this batch, by first appearance
        parts = []
        for d in present:
            rows = np.flatnonzero(domain_of == d) if len(present) > 1 else np.arange(len(index))
            images, labels = self._sources[d].get_batch(torch.from_numpy(index[rows]))
            x = images.to(self.device).to(torch.float32).div_(255.0)
            domain = self.domains[d]
            if domain.corruption is not None:
                x = self._corrupt()(x, domain.corruption, domain.severity, seed=self.corruption_seed(d, number))
                if tuple(x.shape) != tuple(images.shape):
                    raise ValueError(f"corrupt({domain.corruption!r}) returned shape {tuple(x.shape)} for input "
                                     f"{tuple(images.shape)}")
            parts.append((rows, x.to(torch.float32), labels))
        if len(parts) == 1:
            _, x, y = parts[0]
        else:
            x = torch.empty((len(index),) + tuple(parts[0][1].shape[1:]), dtype=torch.float32, device=self.device)
            y = torch.empty(len(index), dtype=torch.int64)
            for rows, part, labels in parts:
                x[torch.from_numpy(rows).to(self.device)] = part
                y[torch.from_numpy(rows)] = labels
        return Batch(x.contiguous(), y, torch.from_numpy(domain_of.astype(np.int64)), segment, number)

    def __iter__(self) -> Iterator[Batch]:
        for segment in range(len(self.segments)):
            yield from self.batches(segment)

    def __len__(self) -> int:
        return self.num_batches()


def make_stream(data: Union[AnyImageDataset, Mapping[str, AnyImageDataset]], protocol: Protocol,
                corrupt_fn: CorruptFn | None = None, device: torch.device | str = "cpu") -> Stream:
    """Join data and a protocol. ``data``: the clean dataset (every domain corrupted on the fly), or a dict of
    datasets keyed by domain name (real domains, or pre-corrupted sets such as CIFAR-10-C loaded with
    ``load_cifar_c``), with the clean data under ``"clean"`` for domains corrupted on the fly. ``corrupt_fn``
    replaces ``streams.corrupt`` (same signature). ``device``: where batches are made, the corruption generator
    included (e.g. ``"cuda"``: decoded images are copied there as uint8 and corrupted there; the results match the
    CPU's to the tolerances of ``tests/test_corruptions.py``)."""
    return Stream(data, protocol, corrupt_fn, device)
