"""Stream protocols as plain data: which domains, in which order, when to reset, how labels are ordered.

A protocol holds no data and no model; :func:`streams.make_stream` joins it with a dataset. The kinds:

- ``reset``: one segment per domain, the adapter is reset before each (``reset_each_shift``).
- ``continual``: one segment per domain in sequence, reset only before the first (continual TTA, CoTTA).
- ``gradual``: for each corruption the severities 1, 2, 3, 4, 5, 4, 3, 2, 1 (one segment per severity), never
  reset after the first; so with corruptions c1, c2 the sequence is c1@1..c1@5..c1@1, c2@1..c2@5..c2@1 and the
  corruption type changes only at severity 1 (the gradual setting of Marsden et al. 2022, as in the
  ``test-time-adaptation`` benchmark code, ``severities = [1, 2, 3, 4, 5, 4, 3, 2, 1]``).
- ``mixed``: one segment in which the samples of all domains are shuffled together, so every batch mixes domains
  (``mixed_domains``).
- ``correlated``: like ``reset`` (one segment per domain, reset before each), but the order inside each domain is
  label-correlated by the Dirichlet scheme of NOTE (Gong et al. 2022) / RoTTA (Yuan et al. 2023), concentration
  ``dirichlet_delta`` (default 0.1; smaller = more correlated), see :func:`streams.orders.dirichlet_order`.
- ``correlated-continual``: label-correlated as ``correlated``, but the domains follow each other without reset
  (as ``continual``): the long, class-biased stream on which BN-based methods are reported to collapse.

Orders are always seeded permutations: data stored class by class is never streamed in file order.

Rounds (``rounds=N``, the continual kinds only: ``continual``, ``gradual``, ``correlated-continual``): the domain
sequence is streamed N times in a row as one chain, without reset, e.g. the 15 corruptions ten times: the long
streams on which continual methods are reported to degrade while periodic resets do not (RDumb, Press et al. 2023;
the recurring setting of PeTTA, Hoang et al. 2024). Each round is a fresh pass over the same images: the same
``n_images`` subset, in a new seeded order, with new corruption noise (and, for ``correlated-continual``, a new
label-correlated order). Why: the repeated CIFAR-10-C protocols revisit the same test images round after round,
while a deployed model never meets the same batch twice (RDumb's CCC goes further: it keeps drawing images and
corruptions anew rather than replaying a fixed corrupted set). Replaying identical batches (as CoTTA's code does
when it reloads the unshuffled CIFAR-10-C arrays at each visit) would reward methods that memorise batches. On
pre-corrupted files (a CIFAR-10-C folder) the noise is fixed in the files, so there a round changes the order
only. Round 0 is bitwise the ``rounds=1`` stream. The
reset-per-domain kinds (``reset``, ``correlated``, ``mixed``) refuse ``rounds > 1``: their rounds would rerun the
same independent segments, costing time and changing nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

KINDS = ("reset", "continual", "gradual", "mixed", "correlated", "correlated-continual")
Kind = Literal["reset", "continual", "gradual", "mixed", "correlated", "correlated-continual"]
CORRELATED_KINDS = ("correlated", "correlated-continual")
CONTINUAL_KINDS = ("continual", "gradual", "correlated-continual")  # never reset after the first domain: rounds
GRADUAL_SEVERITIES = (1, 2, 3, 4, 5, 4, 3, 2, 1)
SEVERITIES = (1, 2, 3, 4, 5)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Domain:
    """One domain of a stream. With ``corruption`` set, its images are the clean data corrupted on the fly at
    ``severity``; with ``corruption=None`` it is a real domain, and ``name`` is its key in the data dict."""

    name: str
    corruption: str | None = None
    severity: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a domain needs a non-empty name, got {self.name!r}")
        if self.corruption is None:
            if self.severity is not None:
                raise ValueError(f"domain {self.name!r}: a severity needs a corruption")
        elif not _is_int(self.severity) or self.severity not in SEVERITIES:
            raise ValueError(f"domain {self.name!r}: severity must be an int in 1..5, got {self.severity!r}")

    @classmethod
    def corrupted(cls, corruption: str, severity: int) -> "Domain":
        """The domain ``<corruption>-<severity>``, e.g. ``gaussian_noise-5``."""
        return cls(f"{corruption}-{severity}", corruption, severity)


@dataclass(frozen=True)
class Protocol:
    """A stream protocol (see the module docstring for the kinds). ``n_images``: a seeded random subset of at
    most that many source images per domain, seeded by the data size only, so every corruption of one dataset
    (and every pre-corrupted copy of it, like the CIFAR-10-C files) uses the same images.
    ``dirichlet_delta``: label correlation inside each segment (None = i.i.d. shuffled). ``rounds``: how many
    times ``domains`` is streamed in a row (continual kinds only; see the module docstring); :attr:`sequence` is
    the whole stream's domain sequence."""

    kind: Kind
    domains: tuple[Domain, ...]
    batch_size: int = 200
    seed: int = 0
    n_images: int | None = None
    dirichlet_delta: float | None = None
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown protocol kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not self.domains or not all(isinstance(d, Domain) for d in self.domains):
            raise ValueError("a protocol needs a non-empty tuple of Domain")
        object.__setattr__(self, "domains", tuple(self.domains))
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.n_images is not None and (not _is_int(self.n_images) or self.n_images < 1):
            raise ValueError(f"n_images must be None or an int >= 1, got {self.n_images!r}")
        if self.dirichlet_delta is not None and not (float(self.dirichlet_delta) > 0):
            raise ValueError(f"dirichlet_delta must be > 0 (or None for i.i.d.), got {self.dirichlet_delta!r}")
        if self.kind in CORRELATED_KINDS and self.dirichlet_delta is None:
            raise ValueError(f"a {self.kind!r} protocol needs dirichlet_delta > 0")
        if self.kind == "gradual" and any(d.corruption is None for d in self.domains):
            raise ValueError("a 'gradual' protocol needs corrupted domains (a severity sequence per corruption)")
        if not _is_int(self.rounds) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        if self.rounds > 1 and self.kind not in CONTINUAL_KINDS:
            raise ValueError(f"rounds={self.rounds}: a {self.kind!r} protocol resets before every domain, so its "
                             f"rounds would repeat the same runs and change nothing but the time; rounds need a "
                             f"continual kind ({', '.join(CONTINUAL_KINDS)})")

    @property
    def sequence(self) -> tuple[Domain, ...]:
        """The domains in stream order over all rounds: ``domains`` repeated ``rounds`` times."""
        return self.domains * self.rounds


def corruption_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Resolve ``"all"`` (the 15 benchmark corruptions), ``"extra"`` (the 4 validation ones), a comma-separated
    string or a sequence of names; unknown names raise ValueError."""
    from streams.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS

    if isinstance(spec, str):
        if spec == "all":
            return tuple(CORRUPTIONS)
        if spec == "extra":
            return tuple(EXTRA_CORRUPTIONS)
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = tuple(spec)
    known = tuple(CORRUPTIONS) + tuple(EXTRA_CORRUPTIONS)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown corruption(s) {unknown or '(none given)'}; known: {', '.join(known)} "
                         f"(or 'all', 'extra')")
    return names


def _severities(severity: int | Sequence[int], kind: str) -> tuple[int, ...]:
    if _is_int(severity):
        values: tuple = GRADUAL_SEVERITIES if kind == "gradual" and severity in SEVERITIES else (severity,)
    elif isinstance(severity, (list, tuple, range)):
        values = tuple(severity)
    else:
        values = ()
    if not values or any(not _is_int(s) or s not in SEVERITIES for s in values):
        raise ValueError(f"severity must be an int in 1..5 (or a sequence of them), got {severity!r}")
    return values


def make_protocol(kind: Kind, corruptions: str | Sequence[str] = "all", severity: int | Sequence[int] = 5,
                  batch_size: int = 200, seed: int = 0, n_images: int | None = None, delta: float = 0.1,
                  domains: Sequence[Union[str, Domain]] | None = None, rounds: int = 1) -> Protocol:
    """Build a protocol.

    ``corruptions``: ``"all"`` (15), ``"extra"`` (4 validation corruptions), or names; each becomes the domain
    ``<corruption>-<severity>``. ``severity``: an int, or a sequence giving several severities per corruption
    (corruption-major order); for ``gradual`` an int means the standard 1,2,3,4,5,4,3,2,1 sequence and a sequence
    replaces it. ``domains``: real domain names (keys of the data dict) or Domain objects, replacing
    ``corruptions``. ``delta`` is used by ``correlated`` and ``correlated-continual`` only. ``rounds``: the domain
    sequence streamed that many times as one chain (``continual``, ``gradual``, ``correlated-continual`` only).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown protocol kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not delta > 0:
        raise ValueError(f"delta (Dirichlet concentration) must be > 0, got {delta!r}")
    if domains is not None:
        chosen = tuple(d if isinstance(d, Domain) else Domain(str(d)) for d in domains)
    else:
        severities = _severities(severity, kind)
        chosen = tuple(Domain.corrupted(c, s) for c in corruption_names(corruptions) for s in severities)
    return Protocol(kind=kind, domains=chosen, batch_size=batch_size, seed=seed, n_images=n_images,
                    dirichlet_delta=float(delta) if kind in CORRELATED_KINDS else None, rounds=rounds)
