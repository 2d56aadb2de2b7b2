"""eta: EATA without the Fisher regulariser (Niu et al., ICML 2022, "Efficient Test-Time Model Adaptation without
Forgetting"). METHODS.md baselines table; reference: MD ``classification/methods/eata.py`` with
``cfgs/cifar10_c/eta.yaml`` (``EATA.FISHER_ALPHA: 0``).

Equation numbers are those the reference code cites. Each gradient step on a batch of C-class logits:

* entropy E(x) = -sum_c p_c log p_c of p = softmax(logits), per sample;
* reliable samples (Eq. 3): E(x) < E0, with E0 = ``margin_e0`` * ln C;
* non-redundant samples (Eq. 5): |cos(p(x), m)| < ``d_margin``, where m is the moving average of the
  probabilities of the samples selected so far (Eq. 4); before any sample was selected there is no m, and every
  reliable sample is kept;
* weight S(x) = 1 / exp(E(x) - E0) of each selected sample (Eq. 3; a constant, no gradient flows through it);
* loss = mean over the selected samples of S(x) E(x) (the reference's "implementation version 1": the whole batch
  is forwarded once, with batch statistics, and the unselected samples are masked out);
* moving average (Eq. 4): m <- ``probs_momentum`` * m + (1 - ``probs_momentum``) * mean of the selected samples'
  probabilities (m <- that mean for the first selection; unchanged when nothing is selected).

A step in which no sample is selected makes no update (``skipped_steps`` counts it, as it counts non-finite
losses); ``reliable_samples`` and ``selected_samples`` count the samples that passed the first and both filters
(the reference's ``num_samples_update_1/2``). ``reset()`` restores the norm-layer tensors, the optimizer, the
moving average (to none) and the counters.

Defaults (MD ``cfgs/cifar10_c/eta.yaml`` on top of ``conf.py``): ``EATA.MARGIN_E0`` 0.4, ``EATA.D_MARGIN`` 0.4,
EMA 0.9 (hard-coded in the reference), Adam lr 1e-3, beta1 0.9, weight decay 0, one step per batch, batch 200.
The parameters trained are the affine parameters of the BatchNorm, LayerNorm and GroupNorm layers, as in the
reference. Deliberate differences: BatchNorm layers normalise with the current batch's statistics but keep the
source statistics untouched (the reference deletes them from BatchNorm2d and puts BatchNorm1d in train mode,
which updates its running statistics without using them); a non-finite loss skips the step (the reference would
take it); the reference's single-sample sliding window and mixed precision are not reproduced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from tta.base import GradientAdapter
from tta.methods.tent import softmax_entropy
from tta.options import GradientOptions, option
from tta.registry import register
from tta.snapshot import weights_changed


def entropy_margin(num_classes: int, margin_e0: float) -> float:
    """E0 = margin_e0 * ln C (Eq. 3)."""
    return margin_e0 * math.log(num_classes)


def update_probability_average(average: torch.Tensor | None, selected_probs: torch.Tensor,
                               momentum: float) -> torch.Tensor | None:
    """Eq. 4: ``momentum * m + (1 - momentum) * mean(selected)``; the mean itself when there is no average yet;
    ``m`` unchanged when nothing was selected."""
    if selected_probs.shape[0] == 0:
        return average
    mean = selected_probs.mean(0)
    if average is None:
        return mean
    return momentum * average + (1 - momentum) * mean


@dataclass
class EtaOptions(GradientOptions):
    """eta's options; defaults are the reference's CIFAR-10-C configuration (Adam, lr 1e-3, beta1 0.9)."""

    margin_e0: float = option(0.4, "reliable-sample margin as a fraction of ln(C): samples with entropy below "
                                   "E0 = margin_e0 * ln(C) are used (Eq. 3; EATA: 0.4)")
    d_margin: float = option(0.4, "redundancy margin epsilon: a sample is used only if the |cosine similarity| of its "
                                  "probabilities to their moving average is below it (Eq. 5; CIFAR: 0.4, ImageNet: "
                                  "0.05)")
    probs_momentum: float = option(0.9, "weight of the old value in the moving average of the selected samples' "
                                        "probabilities (Eq. 4; EATA: 0.9)")


@register("eta")
class Eta(GradientAdapter):
    """Entropy minimisation on reliable, non-redundant samples, re-weighted by their entropy; norm affine params."""

    Options = EtaOptions
    default_alpha = 0.0
    # E0 above ln(C) (the largest entropy) and a cosine margin above 1 keep every sample.
    select_all_options: ClassVar[dict[str, Any]] = {"margin_e0": 1.05, "d_margin": 1.5}

    def _setup(self) -> None:
        if not 0.0 <= self.options.probs_momentum <= 1.0:
            raise ValueError(f"probs_momentum must be in [0, 1], got {self.options.probs_momentum}")
        super()._setup()
        self.probs_average: torch.Tensor | None = None  # m of Eq. 4; none until a sample is selected
        self.last_selection: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reliable_samples = 0
        self.selected_samples = 0

    # -- the objective ------------------------------------------------------------------------------------------
    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample entropy, the reliable mask (Eq. 3) and the selected mask (reliable and non-redundant, Eq. 5)."""
        entropy = softmax_entropy(logits)
        reliable = entropy < entropy_margin(logits.shape[1], self.options.margin_e0)  # Eq. 3 indicator
        selected = reliable
        if self.probs_average is not None:
            probs = logits.detach().softmax(1)
            cosine = F.cosine_similarity(self.probs_average[None], probs, dim=1)
            selected = reliable & (cosine.abs() < self.options.d_margin)  # Eq. 5
        return entropy, reliable, selected

    def weighted_entropy(self, logits: torch.Tensor, entropy: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Mean over the selected samples of S(x) E(x), S(x) = 1 / exp(E(x) - E0) (Eq. 3; NaN if none)."""
        e0 = entropy_margin(logits.shape[1], self.options.margin_e0)
        chosen = entropy[selected]
        weight = 1.0 / torch.exp(chosen.detach() - e0)  # Eq. 3 sample weight, a constant
        return (weight * chosen).mean()

    def regulariser(self) -> torch.Tensor | None:
        """A term added to the loss (eata's Fisher penalty); eta has none."""
        return None

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The objective of one step under the current moving average: the weighted entropy of the selected samples
        (NaN when none is selected) plus :meth:`regulariser`. The masks it selected stay in ``last_selection``
        (reliable, selected) for the step."""
        entropy, reliable, selected = self.select(logits)
        self.last_selection = (reliable, selected)
        loss = self.weighted_entropy(logits, entropy, selected)
        penalty = self.regulariser()
        return loss if penalty is None else loss + penalty

    # -- the step -----------------------------------------------------------------------------------------------
    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_inference_mode()
        with torch.enable_grad():
            for _ in range(self.options.steps):
                with self._graph_mode(x):
                    logits = self.model(x)
                    loss = self.loss(x, logits)
                reliable, selected = self.last_selection
                count = int(selected.sum())
                self.reliable_samples += int(reliable.sum())
                self.selected_samples += count
                stop = False
                if count == 0:  # every sample filtered out: no update (the reference's perform_update)
                    self.skipped_steps += 1
                elif not bool(torch.isfinite(loss)):
                    self.skipped_steps += 1
                    stop = True
                else:
                    with torch.no_grad():  # Eq. 4, with the probabilities of this step's selected samples
                        self.probs_average = update_probability_average(
                            self.probs_average, logits.detach()[selected].softmax(1), self.options.probs_momentum)
                    self.optimizer.zero_grad(set_to_none=True)
                    self._backward(loss)
                    if not self._step_optimizer():  # float16 gradients overflowed: a smaller loss scale
                        self.skipped_steps += 1
                    weights_changed()
                self._after_attempt()
                if stop:
                    break
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    def _after_attempt(self) -> None:
        """Called after every step attempted, taken or skipped (the base class's ``_after_step`` follows only the
        steps taken); rdumb counts these attempts."""

    # -- state --------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.probs_average = None
        self.last_selection = None
        self.reliable_samples = 0
        self.selected_samples = 0

    def get_extra_state(self) -> dict[str, Any]:
        average = None if self.probs_average is None else self.probs_average.clone()
        return {**super().get_extra_state(), "probs_average": average, "reliable_samples": self.reliable_samples,
                "selected_samples": self.selected_samples}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        average = state.get("probs_average")
        self.probs_average = None if average is None else average.detach().clone()
        self.reliable_samples = int(state.get("reliable_samples", 0))
        self.selected_samples = int(state.get("selected_samples", 0))
