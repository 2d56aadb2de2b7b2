"""Seeded sample orders for streams: derived seeds, shuffles, and the Dirichlet label-correlated order.

Everything here is pure numpy on integer arrays and depends only on its seed, so a stream can rebuild the
order of any segment on its own (resume) and get exactly the same batches.
"""
from __future__ import annotations

import zlib

import numpy as np

MAX_SLOTS = 100


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 32-bit seed that depends on ``seed`` and every key (strings hashed with CRC-32, stable across runs)."""
    words = [seed & 0xFFFFFFFFFFFFFFFF]
    words += [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def generator(seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def shuffled_order(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random permutation of ``range(n)`` (i.i.d. order)."""
    return rng.permutation(n)


def dirichlet_order(labels: np.ndarray, delta: float, rng: np.random.Generator,
                    num_slots: int | None = None) -> np.ndarray:
    """A label-correlated permutation of ``range(len(labels))`` (the scheme of NOTE, Gong et al. 2022, as
    implemented in RoTTA's ``LabelDirichletDomainSequence``, Yuan et al. 2023).

    Time is cut into ``num_slots`` slots (default: the number of classes present, at most 100). For every class,
    proportions over the slots are drawn from Dir(delta, ..., delta) and the class's (shuffled) samples are split
    into consecutive chunks of those sizes, chunk s going to slot s. Slots are emitted in order; within a slot the
    class chunks come one after another in a random class order. Small delta puts most of a class in one slot, so
    consecutive batches hold few classes. Large delta spreads every class evenly over the slots, but the chunks
    stay contiguous, so even then the stream is not i.i.d. (as in the reference code; use no Dirichlet order for an
    i.i.d. stream). Differences from the reference
    code: samples are shuffled within each class first (RoTTA keeps file order; NOTE shuffles), and NOTE's extra
    balancing/retry loop (capping each slot at N/slots) is not applied. Every sample appears exactly once.
    """
    if not delta > 0:
        raise ValueError(f"the Dirichlet concentration delta must be > 0, got {delta}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    slots = num_slots or min(len(classes), MAX_SLOTS)
    proportions = rng.dirichlet(np.full(slots, float(delta)), size=len(classes))
    chunks: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for cls, weights in zip(classes, proportions):
        ids = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(weights)[:-1] * len(ids)).astype(np.int64)
        for slot, part in enumerate(np.split(ids, cuts)):
            chunks[slot].append(part)
    pieces = [slot_chunks[i] for slot_chunks in chunks for i in rng.permutation(len(slot_chunks))]
    return np.concatenate(pieces).astype(np.int64)
