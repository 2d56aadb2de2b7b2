"""roid: universal TTA through weight ensembling, diversity weighting and prior correction (Marsden, Döbler and
Yang, WACV 2024). Reference: mariodoebler/test-time-adaptation (MD) ``classification/methods/roid.py``, defaults
from ``conf.py`` and ``cfgs/cifar10_c/roid.yaml``.

Each step, on logits z of the batch (B samples, C classes), p = softmax(z); the paper's terms, in its order:

* soft likelihood ratio (SLR) loss, per sample: l_i = -sum_c p_ic log(p_ic / (1 - p_ic) + eps), with p clamped
  to at most 0.99 and eps = 1e-5 (:func:`soft_likelihood_ratio`).
* diversity weight (:func:`roid_weights`): d_i = 1 - cos(p_bar, p_i) against an exponential moving average of the
  batch-mean prediction, p_bar <- 0.9 p_bar + 0.1 mean_i p_i (``probs_momentum``, initialised uniform, updated
  once per step after the weights are computed); d is min-max normalised over the batch and samples with
  d_i < mean(d) are dropped.
* certainty weight: c_i = -H(p_i), min-max normalised; the weight of a kept sample is exp(d_i c_i / T),
  T = 1/3 (``temperature``).
* consistency loss (``consistency``): the kept samples are augmented (:func:`tta.augment.consistency_augment`,
  CoTTA's transform without blur and noise, reflect-padded, as MD's ``get_tta_transforms(..., cotta_augs=False)``:
  colour jitter, padded rotation/translation/scale, flip; one draw per batch) and forwarded again; the symmetric
  cross-entropy between the two predictions, 0.5 CE(p, q_aug) + 0.5 CE(q_aug, p), is weighted by the same
  weights. Total loss = (sum_kept w_i l_i + sum_kept w_i SCE_i) / B.
* weight ensembling, after every optimizer step: theta <- 0.99 theta + 0.01 theta_source for the trained
  parameters (``source_momentum``).
* prior correction of the returned output: pi = mean_i p_i, s = max(1/B, 1/C) / max(pi), pi_s = (pi + s) / (1 +
  s C), and the logits are returned multiplied by pi_s class-wise (MD multiplies the logits, not the
  probabilities; we follow it).

What is trained and how, as MD: the affine parameters of every normalisation layer (BatchNorm with the current
batch's statistics, as tent; LayerNorm/GroupNorm as they are); Adam, lr 1e-3, beta1 0.9, no weight decay, one step
per batch of 200 (CIFAR-10-C). The model stays in eval mode (MD too; its BatchNorm1d layers are put in train mode,
which here is the same batch statistics). Published anchor (MD README, CIFAR-10-C sev. 5, WRN-28-10, continual):
16.2 % error.

Deliberate differences from MD:

* The loss is divided by the actual batch size, MD by the configured one (``TEST.BATCH_SIZE``; the same except for
  a smaller last batch).
* Min-max normalisation over a batch whose values are all equal (a batch of 1 on a model without BatchNorm) gives
  zeros (every sample kept with weight 1) instead of MD's 0/0 = NaN.
* The augmentation is our PyTorch re-implementation with its own random stream (``seed``, restored by reset(), so
  ``episodic=True`` restarts it with every batch), not torchvision's transforms on the global generator.
* Weighting off keeps every sample with weight 1 (MD's code then fails when the consistency loss is on).
* A non-finite loss skips the step and the ensembling (``skipped_steps``); the probability EMA has moved, as in MD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tta.augment import consistency_augment
from tta.base import GradientAdapter
from tta.options import GradientOptions, option
from tta.registry import register
from tta.snapshot import Snapshot


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample SLR loss: -sum_c p_c log(p_c / (1 - p_c) + eps), p = softmax clamped to [0, clip]."""
    p = logits.softmax(1).clamp(0.0, clip)
    return -(p * torch.log(p / (1.0 - p) + eps)).sum(1)


def symmetric_cross_entropy(logits_aug: torch.Tensor, logits: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample (1 - alpha) CE(softmax(z), z_aug) + alpha CE(softmax(z_aug), z)."""
    return (-(1.0 - alpha) * (logits.softmax(1) * logits_aug.log_softmax(1)).sum(1)
            - alpha * (logits_aug.softmax(1) * logits.log_softmax(1)).sum(1))


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(v - min) / (max - min); zeros when all values are equal."""
    low, high = values.min(), values.max()
    span = high - low
    return torch.where(span > 0, (values - low) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(values))


def roid_weights(logits: torch.Tensor, probs_ema: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, keep): diversity x certainty weights exp(d c / T), zero for the dropped samples (d < mean d)."""
    probs = logits.softmax(1)
    diversity = min_max(1.0 - F.cosine_similarity(probs_ema[None, :], probs, dim=1))
    keep = ~(diversity < diversity.mean())
    certainty = min_max((probs * logits.log_softmax(1)).sum(1))  # -H(p)
    weights = torch.exp(diversity * certainty / temperature) * keep
    return weights, keep


def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """The logits multiplied class-wise by the smoothed batch prior (pi + s) / (1 + s C), s = max(1/B, 1/C)/max pi."""
    b, c = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1.0 / b, 1.0 / c) / prior.max()
    return logits * ((prior + smooth) / (1.0 + smooth * c))


@dataclass
class RoidOptions(GradientOptions):
    """ROID's options; defaults are MD's CIFAR-10-C configuration (Adam, lr 1e-3, beta1 0.9, batch 200)."""

    weighting: bool = option(True, "diversity and certainty weights (drop samples with diversity below the mean)")
    consistency: bool = option(True, "symmetric cross-entropy to an augmented view of the kept samples (needs "
                                     "(N, C, H, W) images)")
    prior_correction: bool = option(True, "multiply the returned logits by the smoothed batch prior")
    source_momentum: float = option(0.99, "weight ensembling: theta <- m theta + (1 - m) theta_source after each "
                                          "step (1 = off)")
    probs_momentum: float = option(0.9, "momentum of the EMA of the mean prediction used by the diversity weight")
    temperature: float = option(1 / 3, "temperature of the weights exp(diversity * certainty / T)")
    seed: int = option(0, "seed of the augmentation's random stream (restored by reset())")


@register("roid")
class Roid(GradientAdapter):
    """SLR loss with diversity/certainty weights and a consistency term, weight ensembling with the source, prior
    correction of the output; norm-layer affine parameters, batch statistics."""

    Options = RoidOptions
    default_alpha = 0.0
    multi_pass = True  # the augmented view is a second forward pass
    inputs = "images"  # with consistency on (off: any input the model takes)

    def _setup(self) -> None:
        o = self.options
        if not 0.0 <= o.source_momentum <= 1.0 or not 0.0 <= o.probs_momentum <= 1.0:
            raise ValueError("roid: source_momentum and probs_momentum must be in [0, 1], got "
                             f"{o.source_momentum} and {o.probs_momentum}")
        if o.temperature <= 0:
            raise ValueError(f"roid: temperature must be positive, got {o.temperature}")
        if o.consistency and self._input_ndim not in (None, 4):
            raise ValueError(f"roid: the consistency loss augments (N, C, H, W) images, but this model takes "
                             f"{self._input_ndim}-dimensional input; pass consistency=False")
        super()._setup()
        reference = self.params[0]
        num_classes = self._num_classes()
        self.register_buffer("probs_ema", torch.full((num_classes,), 1.0 / num_classes, dtype=reference.dtype,
                                                     device=reference.device))
        with torch.no_grad():
            self._source_params = [p.detach().clone() for p in self.params]
        self.generator = torch.Generator().manual_seed(o.seed)
        self._generator_state = self.generator.get_state()

    def _num_classes(self) -> int:
        from tta.source_stats import classifier_layer

        try:
            _, head = classifier_layer(self.model)
        except ValueError:
            head = None
        if head is None or not hasattr(head, "out_features"):
            raise ValueError("roid needs the number of classes: found no nn.Linear classifier in the model")
        return int(head.out_features)

    def _make_snapshot(self) -> Snapshot:
        norm = self._norm_tensors()
        seen = {id(t) for t in norm}
        return Snapshot(norm + [p for p in self.params if id(p) not in seen] + [self.probs_ema], self.optimizer)

    def reset(self) -> None:
        super().reset()
        self.generator.set_state(self._generator_state)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The view for the consistency loss (a test may replace this attribute with a deterministic function)."""
        return consistency_augment(x, self.generator)

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """ROID's loss on the batch; moves the probability EMA (once per call, as MD)."""
        o = self.options
        batch = logits.shape[0]
        if o.weighting:
            with torch.no_grad():
                weights, keep = roid_weights(logits, self.probs_ema, o.temperature)
                self.probs_ema.mul_(o.probs_momentum).add_(logits.softmax(1).mean(0), alpha=1.0 - o.probs_momentum)
        else:
            weights = torch.ones(batch, dtype=logits.dtype, device=logits.device)
            keep = torch.ones(batch, dtype=torch.bool, device=logits.device)
        loss = (soft_likelihood_ratio(logits) * weights)[keep].sum() / batch
        if o.consistency:
            logits_aug = self.model(self.augment(x[keep]))
            loss = loss + (symmetric_cross_entropy(logits_aug, logits[keep]) * weights[keep]).sum() / batch
        return loss

    @torch.no_grad()
    def _after_step(self) -> None:
        """Weight ensembling with the source: theta <- m * theta + (1 - m) * theta_source."""
        m = self.options.source_momentum
        if m < 1.0:
            for p, source in zip(self.params, self._source_params):
                p.mul_(m).add_(source, alpha=1.0 - m)

    def _output(self, logits: torch.Tensor) -> torch.Tensor:
        return prior_correction(logits) if self.options.prior_correction else logits

    def _check_method_input(self, x: torch.Tensor) -> None:
        if self.options.consistency and x.dim() != 4:
            raise ValueError(f"roid: the consistency loss augments (N, C, H, W) images, got shape {tuple(x.shape)}; "
                             "pass consistency=False for other inputs")

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
