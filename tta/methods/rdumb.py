"""rdumb: eta with a periodic full reset (Press et al., NeurIPS 2023, "RDumb: A simple approach that questions our
progress in continual test-time adaptation"). METHODS.md baselines table; reference: MD ``cfgs/cifar10_c/rdumb.yaml``
(``MODEL.ADAPTATION: eata`` with ``EATA.FISHER_ALPHA: 0``, i.e. ETA, and ``MODEL.RESET_AFTER_NUM_UPDATES: 1000``;
the reset itself lives in MD's ``methods/base.py``).

Every step is :mod:`tta.methods.eta`'s. After every ``reset_every``-th step the model returns to the source:
norm-layer parameters and buffers, the optimizer's state and the moving average of probabilities (to none). As in
the reference, the count is of steps attempted (``steps`` per batch), whether or not the step made an update (a
step in which every sample was filtered out counts); the logits of the batch whose step triggers the reset are
those computed before it, and a reset in the middle of a batch's steps lets its remaining steps start from the
source. ``steps_since_reset`` counts towards the next reset and ``resets`` counts the resets; ``reset()`` zeroes
both (with everything eta restores). The run counters (``batches_seen``, ``skipped_steps``, ``reliable_samples``,
``selected_samples``) keep counting across the periodic resets.

Defaults: ``reset_every`` 1000 (the paper's T = 1000 and MD's CIFAR-10-C value) and eta's (margins 0.4 and 0.4,
EMA 0.9, Adam lr 1e-3, beta1 0.9). Deliberate differences: those of eta (:mod:`tta.methods.eta`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tta.methods.eta import Eta, EtaOptions
from tta.options import option
from tta.registry import register


@dataclass
class RdumbOptions(EtaOptions):
    reset_every: int = option(1000, "reset to the source model after this many steps (RDumb: T = 1000); every step "
                                    "attempted counts, with or without an update")


@register("rdumb")
class Rdumb(Eta):
    """eta, reset to the source model (parameters, statistics, optimizer, moving average) every ``reset_every``
    steps."""

    Options = RdumbOptions

    def _setup(self) -> None:
        if isinstance(self.options.reset_every, bool) or not isinstance(self.options.reset_every, int) \
                or self.options.reset_every < 1:
            raise ValueError(f"reset_every must be a positive number of steps, got {self.options.reset_every!r} "
                             "(method 'eta' never resets)")
        super()._setup()
        self.steps_since_reset = 0
        self.resets = 0

    def _after_attempt(self) -> None:
        self.steps_since_reset += 1
        if self.steps_since_reset >= self.options.reset_every:
            self.reset_to_source()

    def reset_to_source(self) -> None:
        """The periodic reset: the source model, a fresh optimizer and no moving average; run counters go on."""
        self._snapshot.restore()
        self.probs_average = None
        self.last_selection = None
        self.steps_since_reset = 0
        self.resets += 1

    def reset(self) -> None:
        super().reset()
        self.steps_since_reset = 0
        self.resets = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "steps_since_reset": self.steps_since_reset, "resets": self.resets}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.steps_since_reset = int(state.get("steps_since_reset", 0))
        self.resets = int(state.get("resets", 0))
